"""Every leaf command x every kind of bad input (issue 22): exit code 2, exactly one line on stderr, no traceback,
no model code or pickle payload run, and no file written outside --out (nor a result file inside it).

The cases run in-process through `engramlab.cli.main` (what the `engramlab` script runs) with the file descriptors
captured, so a library's warning or log line on stderr counts as a second line. The bad models, reused result
folders and data files are built once per session; most cases fail before any model is loaded, which the tests
check where it is promised ("before": from_pretrained must not be called). The relation files come from
hypothesis as well as from a hand-written list.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from conftest import tiny_model
from engramlab.cli import main

RELATIONS = "country_capital,city_country"
PWNED = "engramlab-fuzz-pwned"  # a file the pickle payloads would create if they ever ran


# ------------------------------------------------------------------------------------------------ session fixtures


class _Payload:
    """Unpickling this creates the PWNED file in the working folder: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.mkdir, (PWNED,))


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 99)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@dataclass
class Inputs:
    """Every input the cases draw on, built once."""

    root: Path
    good: Path  # a tiny Llama with a tokenizer: it loads, and knows no fact
    models: dict[str, Path]  # bad model directories (and non-directories) by kind
    finds: dict[str, Path]  # `relations find` folders: "good" and damaged ones
    atlases: dict[str, Path]
    sources: dict[str, Path]
    mnist: dict[str, Path]
    corruptions: Path  # an empty CIFAR-C folder


def _bad_models(root: Path, good: Path) -> dict[str, Path]:
    models = {"missing": root / "no-such-model", "file": root / "model-file.txt"}
    models["file"].write_text("not a model")
    for name, text in {
        "empty-config": "",
        "invalid-config": '{"model_type": "llama",',
        "unknown-type": json.dumps({"model_type": "no_such_arch", "hidden_size": 8}),
        "remote-code": json.dumps(
            {"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "modeling.Custom"}, "architectures": ["C"]}
        ),
    }.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
        shutil.copy(good / "model.safetensors", root / name / "model.safetensors")
    models.update({n: root / n for n in ("empty-config", "invalid-config", "unknown-type", "remote-code")})

    models["no-weights"] = root / "no-weights"
    models["no-weights"].mkdir()
    shutil.copy(good / "config.json", models["no-weights"])

    models["truncated-safetensors"] = _copy(good, root / "truncated")
    weights = models["truncated-safetensors"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    models["pickle-bin"] = root / "pickle-bin"
    models["pickle-bin"].mkdir()
    shutil.copy(good / "config.json", models["pickle-bin"])
    with open(models["pickle-bin"] / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, f)

    models["bad-tokenizer"] = _copy(good, root / "bad-tokenizer")
    (models["bad-tokenizer"] / "tokenizer.json").write_text('{"version": "1.0", "model": {')

    models["shape-mismatch"] = _copy(good, root / "shape-mismatch")
    config = json.loads((good / "config.json").read_text())
    (models["shape-mismatch"] / "config.json").write_text(json.dumps({**config, "intermediate_size": 41}))
    return models


def _find_folder(folder: Path, n_units: int) -> Path:
    """A `relations find` result for the tiny Llama (2 relations), written as `relations find` writes it."""
    folder.mkdir()
    counts = {n: {"candidates": 40, "validated": 30, "negatives": 30} for n in RELATIONS.split(",")}
    meta = {"relations": RELATIONS.split(","), "units": "neurons", "response": "last", "n_units": n_units, "k": 5}
    (folder / "find.json").write_text(json.dumps({**meta, "counts": counts, "seconds": 1.0, "seed": 0}))
    ap = np.random.default_rng(0).random((2, n_units)).astype(np.float32)
    save_file({"ap": ap}, str(folder / "ap.safetensors"))
    rows = {
        "relation": ["country_capital", "city_country"] * 30,
        "prompt": ["w3 w4"] * 60,
        "gold": ["w5"] * 60,
        "subject": ["w3"] * 60,
        "subject_start": [0] * 60,
        "frame": ["p1"] * 60,
        "template_split": ["selection"] * 60,
        "correct": [True] * 60,
        "prediction": ["w5"] * 60,
    }
    pq.write_table(pa.table(rows), folder / "identification_prompts.parquet")
    return folder


def _finds(root: Path, n_units: int) -> dict[str, Path]:
    good = _find_folder(root / "find-good", n_units)
    finds = {"good": good}
    damage: dict[str, Callable[[Path], None]] = {
        "find-json-invalid": lambda d: (d / "find.json").write_text("{"),
        "find-json-keys": lambda d: (d / "find.json").write_text("{}"),
        "find-json-types": lambda d: (d / "find.json").write_text(
            json.dumps({**json.loads((good / "find.json").read_text()), "k": "many"})
        ),
        "find-json-relations": lambda d: (d / "find.json").write_text(
            json.dumps({**json.loads((good / "find.json").read_text()), "relations": "country_capital"})
        ),
        "ap-truncated": lambda d: (d / "ap.safetensors").write_bytes((good / "ap.safetensors").read_bytes()[:50]),
        "ap-shape": lambda d: save_file({"ap": np.zeros((2, 7), np.float32)}, str(d / "ap.safetensors")),
        "ap-missing": lambda d: (d / "ap.safetensors").unlink(),
        "parquet-corrupt": lambda d: (d / "identification_prompts.parquet").write_bytes(b"PAR1 garbage PAR1"),
        "parquet-columns": lambda d: pq.write_table(pa.table({"x": [1]}), d / "identification_prompts.parquet"),
        "not-a-folder": lambda d: None,
    }
    for name, damage_fn in damage.items():
        if name == "not-a-folder":
            finds[name] = root / "find-missing"
            continue
        finds[name] = _copy(good, root / name)
        damage_fn(finds[name])
    return finds


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("fuzz-inputs")
    good = root / "good-model"
    model = tiny_model("llama")
    model.save_pretrained(good)
    _word_tokenizer().save_pretrained(good)
    n_units = model.config.num_hidden_layers * (2 * model.config.intermediate_size + model.config.hidden_size)

    atlases = {"missing": root / "no-atlas", "corrupt": root / "atlas-corrupt", "columns": root / "atlas-columns"}
    atlases["corrupt"].mkdir()
    (atlases["corrupt"] / "atlas.parquet").write_bytes(b"PAR1\x00\x01garbagePAR1")
    atlases["columns"].mkdir()
    pq.write_table(pa.table({"a": [1, 2]}), atlases["columns"] / "atlas.parquet")

    from engramlab.tta.source_model import SHIPPED

    sources = {"missing": root / "no-source.safetensors"}
    shipped = Path(str(SHIPPED))
    sources["truncated"] = root / "source-truncated" / "source.safetensors"
    sources["truncated"].parent.mkdir()
    sources["truncated"].write_bytes(shipped.read_bytes()[:100])
    shutil.copy(shipped.with_suffix(".json"), sources["truncated"].with_suffix(".json"))
    sources["bad-card"] = root / "source-bad-card" / "source.safetensors"
    sources["bad-card"].parent.mkdir()
    shutil.copy(shipped, sources["bad-card"])
    sources["bad-card"].with_suffix(".json").write_text('{"recipe": ')
    sources["card-values"] = root / "source-card-values" / "source.safetensors"
    sources["card-values"].parent.mkdir()
    shutil.copy(shipped, sources["card-values"])
    sources["card-values"].with_suffix(".json").write_text(json.dumps({"n_classes": -3, "recipe": {"width": "x"}}))
    sources["pickle-pt"] = root / "source.pt"
    with open(sources["pickle-pt"], "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)

    mnist = {"empty": root / "mnist-empty", "zero-bytes": root / "mnist-zero", "no-items": root / "mnist-none"}
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for kind, folder in mnist.items():
        (folder / "mnist").mkdir(parents=True)
        for name in names if kind != "empty" else ():
            images = "images" in name
            header = bytes([0, 0, 8, 3 if images else 1]) + (0).to_bytes(4, "big")
            header += (28).to_bytes(4, "big") * 2 if images else b""
            (folder / "mnist" / name).write_bytes(b"" if kind == "zero-bytes" else header)
    corruptions = root / "cifar-c-empty"
    corruptions.mkdir()
    return Inputs(
        root,
        good,
        _bad_models(root, good),
        _finds(root, n_units),
        atlases,
        sources,
        mnist,
        corruptions,
    )


# ------------------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Case:
    """One bad input for one leaf command. `args(inputs, out)` gives the arguments; `before` promises the command
    fails before any model is loaded; `keep` names a user file inside --out that must survive untouched."""

    command: str
    kind: str
    args: Callable[[Inputs, Path], list[str]]
    before: bool = True
    out_setup: str | None = None  # "file", "parent-file", "user-file", "unwritable"


def _relations_base(command: str, inputs: Inputs, out: Path) -> list[str]:
    return ["relations", command, "--model", str(inputs.good), "--out", str(out), "--relations", RELATIONS,
            "--device", "cpu"]  # fmt: skip


MODEL_KINDS = (
    "missing",
    "file",
    "empty-config",
    "invalid-config",
    "unknown-type",
    "remote-code",
    "no-weights",
    "truncated-safetensors",
    "pickle-bin",
    "bad-tokenizer",
    "shape-mismatch",
)
RELATIONS_COMMANDS = ("find", "deactivate", "diagnose", "perplexity", "sweep", "matrix", "overlap", "multilingual")
POSTTRAIN_COMMANDS = ("knowledge", "truth", "entropy", "refusal", "compare")


def _with_model(command: list[str], flag: str | None) -> Callable[[str], Callable[[Inputs, Path], list[str]]]:
    """Arguments of a command that loads a model, with the model replaced by a bad one (`flag` None: positional)."""

    def for_kind(kind: str) -> Callable[[Inputs, Path], list[str]]:
        def args(inputs: Inputs, out: Path) -> list[str]:
            model = str(inputs.models[kind])
            where = [model] if flag is None else [flag, model]
            return [*command[:2], *where, *[str(out) if a == "OUT" else a for a in command[2:]]]

        return args

    return for_kind


MODEL_COMMANDS = {
    "models info": (["models", "info"], None),
    "tour": (["tour", "--out", "OUT", "--only", "model", "--device", "cpu"], "--model"),
    "organisms eval": (["organisms", "eval", "--out", "OUT"], None),
    **{
        f"relations {c}": (["relations", c, "--out", "OUT", "--relations", RELATIONS, "--device", "cpu"], "--model")
        for c in RELATIONS_COMMANDS
    },
    "decode atlas": (["decode", "atlas", "--out", "OUT", "--device", "cpu"], "--model"),
    "decode compare": (["decode", "compare", "--out", "OUT", "--b", "organism:base", "--device", "cpu"], "--a"),
    "decode steer": (["decode", "steer", "--neuron", "0:1", "--prompt", "w3", "--device", "cpu"], "--model"),
    **{f"posttrain {c}": (["posttrain", c, "--out", "OUT", "--device", "cpu"], "--base") for c in POSTTRAIN_COMMANDS},
}


def _model_cases() -> list[Case]:
    cases = []
    for command, (argv, flag) in MODEL_COMMANDS.items():
        for kind in MODEL_KINDS:
            if command == "models info" and kind == "bad-tokenizer":
                continue  # `models info` reads no tokenizer: that model is fine for it
            cases.append(Case(command, f"model-{kind}", _with_model(argv, flag)(kind), before=False))
    return cases


def _args(*parts: str) -> Callable[[Inputs, Path], list[str]]:
    """Arguments with placeholders: OUT, GOOD (the tiny model), CORRUPTIONS, and FIND:, ATLAS:, SOURCE:, MNIST:,
    MODEL: followed by a kind."""
    return lambda inputs, out: [_resolve(part, inputs, out) for part in parts]


def _resolve(part: str, inputs: Inputs, out: Path) -> str:
    named = {"OUT": out, "GOOD": inputs.good, "CORRUPTIONS": inputs.corruptions}
    if part in named:
        return str(named[part])
    head, _, tail = part.partition(":")
    kinds = {
        "FIND": inputs.finds,
        "ATLAS": inputs.atlases,
        "SOURCE": inputs.sources,
        "MNIST": inputs.mnist,
        "MODEL": inputs.models,
    }
    return str(kinds[head][tail]) if head in kinds and tail in kinds[head] else part


def _option_cases() -> list[Case]:
    """Out-of-range, non-finite and unknown option values, per command; all refused before a model loads."""
    rel = ["--model", "GOOD", "--out", "OUT", "--relations", RELATIONS, "--device", "cpu"]
    table: dict[str, list[list[str]]] = {
        "models info": [[""], ["GOOD", "--device", "tpu9"], ["GOOD", "--dtype", "float8"], ["organism:../../x"]],
        "tour": [
            ["--only", ","],
            ["--only", "nope"],
            ["--seed", "-1"],
            ["--device", "bogus"],
            ["--model", "organism:../base"],
        ],
        "organisms build": [
            ["--out", "OUT", "--layers", "0"],
            ["--out", "OUT", "--hidden", "7"],
            ["--out", "OUT", "--seed", "-1"],
            ["--out", "OUT", "--reworded-statements", "nan"],
            ["--out", "OUT", "--device", "tpu"],
            ["--out", "OUT", "--batch-size", "0"],
            ["--out", "OUT", "--init-base", "MODEL:truncated-safetensors", "--quick"],
            ["--out", "OUT", "--init-base", "MODEL:missing", "--quick"],
        ],
        "organisms eval": [["organism:base", "--out", "OUT", "--max-facts", "-1"], ["", "--out", "OUT"]],
        "organisms list": [["--bogus"]],
        "models census": [["--families", "nope"], ["--families", ","], ["--show", "bogus"]],
        "decode atlas": [
            ["--model", "GOOD", "--out", "OUT", "--top-k", "0"],
            ["--model", "GOOD", "--out", "OUT", "--site", "nowhere"],
            ["--model", "GOOD", "--out", "OUT", "--chunk-size", "0"],
            ["--model", "GOOD", "--out", "OUT", "--dtype", "float7"],
        ],
        "decode search": [
            ["--atlas", "ATLAS:missing", "--word", "dog"],
            ["--atlas", "ATLAS:corrupt", "--word", "dog"],
            ["--atlas", "ATLAS:columns", "--word", "dog"],
            ["--atlas", "ATLAS:corrupt", "--token-id", "-1"],
            ["--atlas", "ATLAS:corrupt", "--word", "dog", "--max-rank", "0"],
            ["--atlas", "ATLAS:corrupt"],
        ],
        "decode compare": [
            ["--a", "GOOD", "--b", "GOOD", "--out", "OUT", "--shared-head", "c"],
            ["--a", "GOOD", "--b", "GOOD", "--out", "OUT", "--seed", "-1"],
            ["--a", "GOOD", "--b", "GOOD", "--out", "OUT", "--top-k", "0"],
        ],
        "decode steer": [
            ["--model", "GOOD", "--neuron", "0:1", "--prompt", "w3", "--values", "1e308"],
            ["--model", "GOOD", "--neuron", "0:1", "--prompt", "w3", "--values", "nan"],
            ["--model", "GOOD", "--neuron", "0:1", "--prompt", "w3", "--values", "a,b"],
            ["--model", "GOOD", "--neuron", "zero", "--prompt", "w3"],
            ["--model", "GOOD", "--neuron", "0:1", "--prompt", "w3", "--max-new-tokens", "-1"],
            ["--model", "GOOD", "--neuron", "0:1", "--prompt", "w3", "--site", "gate"],
        ],
        "continual hlop": [
            ["--out", "OUT", "--lr", "-1"],
            ["--out", "OUT", "--lr", "nan"],
            ["--out", "OUT", "--lr", "inf"],
            ["--out", "OUT", "--momentum", "-1"],
            ["--out", "OUT", "--momentum", "1"],
            ["--out", "OUT", "--ewc-lambda", "nan"],
            ["--out", "OUT", "--gpm-threshold", "0"],
            ["--out", "OUT", "--lateral-neurons", "1000000,200,100", "--tasks", "2"],
            ["--out", "OUT", "--lateral-neurons", "a,b"],
            ["--out", "OUT", "--epochs", "0"],
            ["--out", "OUT", "--tasks", "99"],
            ["--out", "OUT", "--seed", "-1"],
            ["--out", "OUT", "--stream", "bogus"],
            ["--out", "OUT", "--methods", "bogus"],
            ["--out", "OUT", "--methods", ","],
            ["--out", "OUT", "--neuron", "ann", "--train", "dsr"],
            ["--out", "OUT", "--data-dir", "MNIST:empty"],
            ["--out", "OUT", "--data-dir", "MNIST:zero-bytes"],
            ["--out", "OUT", "--data-dir", "MNIST:no-items"],
            ["--out", "OUT", "--stream", "cifar100"],
        ],
        "continual tta": [
            ["--out", "OUT", "--lr", "nan"],
            ["--out", "OUT", "--lr", "-1"],
            ["--out", "OUT", "--ema-alpha", "2"],
            ["--out", "OUT", "--restore-p", "nan"],
            ["--out", "OUT", "--threshold", "5"],
            ["--out", "OUT", "--threshold", "nan"],
            ["--out", "OUT", "--threshold", "abc"],
            ["--out", "OUT", "--severity", "9"],
            ["--out", "OUT", "--rounds", "0"],
            ["--out", "OUT", "--seed", "-1"],
            ["--out", "OUT", "--method", "bogus"],
            ["--out", "OUT", "--source", "SOURCE:missing"],
            ["--out", "OUT", "--source", "SOURCE:truncated"],
            ["--out", "OUT", "--source", "SOURCE:bad-card"],
            ["--out", "OUT", "--source", "SOURCE:card-values"],
            ["--out", "OUT", "--source", "SOURCE:pickle-pt"],
            ["--out", "OUT", "--data-dir", "CORRUPTIONS", "--source", "SOURCE:bad-card"],
        ],
        "continual train-source": [["--out", "OUT", "--epochs", "0"], ["--out", "OUT", "--seed", "-1"]],
    }
    for c in RELATIONS_COMMANDS:
        bad = [
            ["--k", "0"],
            ["--k", "-1"],
            ["--max-prompts", "0"],
            ["--batch-size", "0"],
            ["--seed", "-1"],
            ["--min-validated", "0"],
            ["--min-validated-share", "nan"],
            ["--min-validated-share", "2"],
            ["--response", "bogus"],
            ["--units", "bogus"],
            ["--device", "tpu9"],
            ["--dtype", "float7"],
            ["--relations", "no_such_relation"],
            ["--relations", "country_capital"],
            ["--heldout-templates", "p9"],
            ["--bogus-option"],
        ]
        if c != "find":
            bad += [
                ["--neurons", f"FIND:{kind}"]
                for kind in ("find-json-invalid", "find-json-keys", "find-json-types", "find-json-relations")
            ]
            bad += [
                ["--neurons", f"FIND:{kind}"] for kind in ("ap-truncated", "ap-shape", "ap-missing", "not-a-folder")
            ]
            if c != "sweep":
                bad.append(["--neurons", "FIND:good", "--k", "100000000"])
        if c != "multilingual":
            bad += [["--relation-file", "MISSING.json"]]
        extra = {
            "deactivate": [["--random-seeds", "-1"], ["--diagnose-top", "0"], ["--eval-subjects", "0"]],
            "diagnose": [["--top", "0"]],
            "perplexity": [["--max-objects", "0"], ["--random-seeds", "-1"]],
            "sweep": [["--ks", "-5"], ["--ks", "0"], ["--ks", "a,b"], ["--ks", ","], ["--ks", "100000000"]],
            "multilingual": [["--languages", "xx"], ["--languages", ","]],
        }
        table[f"relations {c}"] = [[*rel, *b] for b in bad + extra.get(c, [])]
    for c in POSTTRAIN_COMMANDS:
        pt = ["--base", "GOOD", "--post", "GOOD", "--out", "OUT", "--device", "cpu"]
        bad = [["--seed", "-1"], ["--batch-size", "0"], ["--dtype", "float7"], ["--device", "tpu9"]]
        bad += {
            "knowledge": [["--noise-scale", "nan"], ["--noise-scale", "-1"], ["--max-pairs", "1"], ["--variant", "x"]],
            "truth": [["--per-set", "0"], ["--token", "x"]],
            "refusal": [["--coeff", "inf"], ["--coeff", "nan"]],
        }.get(c, [])
        table[f"posttrain {c}"] = [[*pt, *b] for b in bad]
    for c in ("deactivate", "diagnose", "perplexity"):  # the commands that read the find's prompts back
        table[f"relations {c}"] += [
            [*rel, "--neurons", f"FIND:{kind}"] for kind in ("parquet-corrupt", "parquet-columns")
        ]
    # checks that need the model itself: whether --init-base loads, --ks against its unit count (without --neurons
    # the count is known only once the model is loaded; still before any file is written), and the find's prompts,
    # read back once the model has been checked against the find
    needs_model = {
        ("organisms build", "MODEL:truncated-safetensors"),
        ("relations sweep", "100000000"),
        *((f"relations {c}", f"FIND:{k}") for c in RELATIONS_COMMANDS for k in ("parquet-corrupt", "parquet-columns")),
    }
    cases = []
    for command, bad_args in table.items():
        prefix = command.split()
        for args in bad_args:
            kind = " ".join(args[-2:] if len(args) > 1 else args).replace("OUT", "out")
            before = not any(command == c and what in args for c, what in needs_model)
            cases.append(Case(command, f"option {kind}", _args(*prefix, *args), before=before))
    return cases


# the commands that have a folder --out, with arguments that are otherwise valid and fail fast if --out passed
OUT_COMMANDS = {
    "tour": ["tour", "--model", "GOOD", "--only", "model", "--device", "cpu", "--out", "OUT"],
    "organisms build": ["organisms", "build", "--quick", "--out", "OUT"],
    "organisms eval": ["organisms", "eval", "GOOD", "--out", "OUT"],
    **{
        f"relations {c}": [
            "relations",
            c,
            "--model",
            "GOOD",
            "--relations",
            RELATIONS,
            "--device",
            "cpu",
            "--out",
            "OUT",
        ]
        for c in RELATIONS_COMMANDS
    },
    "decode atlas": ["decode", "atlas", "--model", "GOOD", "--device", "cpu", "--out", "OUT"],
    "decode compare": ["decode", "compare", "--a", "GOOD", "--b", "GOOD", "--device", "cpu", "--out", "OUT"],
    "decode steer": ["decode", "steer", "--model", "GOOD", "--neuron", "0:1", "--prompt", "w3", "--out", "OUT"],
    **{
        f"posttrain {c}": ["posttrain", c, "--base", "GOOD", "--post", "GOOD", "--out", "OUT"]
        for c in POSTTRAIN_COMMANDS
    },
    "continual hlop": ["continual", "hlop", "--tasks", "1", "--out", "OUT"],
    "continual tta": ["continual", "tta", "--out", "OUT"],
    "continual train-source": ["continual", "train-source", "--out", "OUT"],
}
RESUMABLE = {f"relations {c}" for c in RELATIONS_COMMANDS} | {"continual hlop"}


def _out_cases() -> list[Case]:
    cases = []
    for command, argv in OUT_COMMANDS.items():
        setups = ["file", "parent-file", "unwritable"]
        if command != "organisms build":  # a build folder with a user's file is refused too, tested below
            setups.append("user-file")
        if command in RESUMABLE:
            setups.append("user-file-resume")
        for setup in setups:
            extra = ["--resume"] if setup == "user-file-resume" else []
            cases.append(Case(command, f"out {setup}", _args(*argv, *extra), out_setup=setup.removesuffix("-resume")))
    cases.append(
        Case("organisms build", "out user-file", _args(*OUT_COMMANDS["organisms build"]), out_setup="user-file")
    )
    search = ["decode", "search", "--atlas", "ATLAS:columns", "--word", "dog", "--out", "OUT"]
    cases.append(Case("decode search", "out folder", _args(*search), out_setup="folder"))
    cases.append(Case("decode search", "out exists", _args(*search), out_setup="user-file-itself"))
    census = ["models", "census", "--families", "llama", "--out", "OUT"]
    cases.append(Case("models census", "out folder", _args(*census), out_setup="folder"))
    cases.append(Case("models census", "out exists", _args(*census), out_setup="user-file-itself"))
    return cases


def _relation_file_cases() -> list[Case]:
    """Hand-written bad relation files (hypothesis adds generated ones below)."""
    files = {
        "malformed": '{"name": "r", "prompt_templates": ["{} is in"], "samples": [',
        "escaped-key": '{"name": "r", "prompt_templates": ["{} in"], "sampl\\u0065s": [{"subject": "a"}]}',
        "escaped-key-valid": json.dumps(
            {
                "name": "r",
                "prompt_templates": ["{} is in"],
                "samples": [{"subject": f"w{i}", "object": "w5"} for i in range(3, 15)],
            }
        ).replace('"samples"', '"sampl\\u0065s"'),
        "not-object": "[1, 2, 3]",
        "samples-not-list": '{"name": "r", "prompt_templates": ["{} is in"], "samples": {"subject": "a"}}',
        "no-braces": '{"name": "r", "prompt_templates": ["is in"], "samples": []}',
        "two-braces": '{"name": "r", "prompt_templates": ["{} {} in"], "samples": []}',
        "few-subjects": '{"name": "r", "prompt_templates": ["{} in"], "samples": [{"subject": "a", "object": "b"}]}',
        "surrogate": '{"name": "\\ud800", "prompt_templates": ["{} in"], "samples": []}',
        "surrogate-subject": json.dumps(
            {
                "name": "r",
                "prompt_templates": ["{} in"],
                "samples": [{"subject": f"w{i}", "object": "w5"} for i in range(12)],
            }
        ).replace('"w3"', '"\\udc80"'),
        "deep": "[" * 100_000 + "]" * 100_000,
        "latin1": "\xe9".encode("latin-1"),
        "empty": "",
    }
    cases = []
    for c in ("find", "deactivate", "overlap"):
        for kind, text in files.items():

            def args(inputs: Inputs, out: Path, text=text, kind=kind, c=c) -> list[str]:
                path = out.parent / f"{kind}.json"
                path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
                return [*_relations_base(c, inputs, out), "--relation-file", str(path)]

            # a well-formed file the tiny model knows nothing of reaches the model and fails at the knowledge gate
            cases.append(Case(f"relations {c}", f"relation-file {kind}", args, before=kind != "escaped-key-valid"))
    return cases


def _unknown_option_cases() -> list[Case]:
    leaves = [
        "models info",
        "models census",
        "tour",
        "organisms build",
        "organisms eval",
        "organisms list",
        *[f"relations {c}" for c in RELATIONS_COMMANDS],
        "decode atlas",
        "decode search",
        "decode compare",
        "decode steer",
        *[f"posttrain {c}" for c in POSTTRAIN_COMMANDS],
        "continual hlop",
        "continual tta",
        "continual train-source",
    ]
    return [Case(leaf, "unknown option", _args(*leaf.split(), "--no-such-option", "1")) for leaf in leaves]


CASES = _model_cases() + _option_cases() + _out_cases() + _relation_file_cases() + _unknown_option_cases()


# ------------------------------------------------------------------------------------------------ running a case


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _prepare_out(setup: str | None, work: Path) -> tuple[Path, Path | None]:
    """The --out path for a case and, when the case puts one there, the user's file that must survive."""
    out = work / "out"
    if setup == "file":
        out.write_text("a user's file")
        return out, out
    if setup == "parent-file":
        (work / "blocker").write_text("a user's file")
        return work / "blocker" / "out", work / "blocker"
    if setup in ("user-file", "folder"):
        out.mkdir()
        (out / "notes.txt").write_text("a user's notes")
        return out, out / "notes.txt"
    if setup == "user-file-itself":
        out.write_text("a user's file")
        return out, out
    if setup == "unwritable":
        if os.geteuid() == 0:  # root writes through permissions: a path no one can create stands in
            return Path("/proc/engramlab-fuzz/out"), None
        locked = work / "locked"
        locked.mkdir(mode=0o555)
        return locked / "out", None
    return out, None


def run_case(case: Case, inputs: Inputs, work: Path, capfd, monkeypatch) -> None:
    monkeypatch.chdir(work)
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *a, **kw):
        loads.append(a[0] if a else kw.get("pretrained_model_name_or_path"))
        return original(cls, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    out, user_file = _prepare_out(case.out_setup, work)
    argv = case.args(inputs, out)
    before_inputs, before_work = _tree(inputs.root), _tree(work)
    user_bytes = user_file.read_bytes() if user_file is not None and user_file.is_file() else None
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # what a plain `engramlab` process shows
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    stdout, stderr = capfd.readouterr()
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    stderr += "".join(f"{w.category.__name__}: {w.message}\n" for w in seen if not issubclass(w.category, hidden))
    lines = [line for line in stderr.splitlines() if line.strip()]
    shown = f"{case.command} / {case.kind}: exit {code}\nargv: {argv}\nstderr:\n{stderr}\nstdout tail:\n{stdout[-800:]}"
    assert code == 2, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert "Traceback" not in stderr + stdout, shown
    assert not (work / PWNED).exists(), "a pickle payload ran"
    if case.before:
        assert not loads, f"{shown}\nloaded a model before failing: {loads}"
    assert _tree(inputs.root) == before_inputs, f"{shown}\nan input was changed"
    after = _tree(work)
    out_rel = str(out.relative_to(work)) if out.is_relative_to(work) else None
    written = {p for p in set(after) - set(before_work) if p != PWNED}
    outside = {p for p in written if out_rel is None or not (p == out_rel or p.startswith(out_rel + os.sep))}
    assert not outside, f"{shown}\nfiles written outside --out: {sorted(outside)}"
    results = {p for p in written - outside if not p.endswith(".engramlab-run.json")}
    assert not results, f"{shown}\nresult files left by a failed run: {sorted(results)}"
    if user_bytes is not None:
        assert user_file.read_bytes() == user_bytes, f"{shown}\nthe user's file was overwritten"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}: {c.kind}" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, inputs, tmp_path, capfd, monkeypatch):
    run_case(case, inputs, tmp_path, capfd, monkeypatch)


def test_every_leaf_command_is_fuzzed():
    """The matrix covers every leaf command of the CLI (a new command must add its cases here)."""
    from typer.main import get_command

    from engramlab.cli import app

    def leaves(group, prefix=()):
        for name, cmd in getattr(group, "commands", {}).items():
            if hasattr(cmd, "commands"):
                yield from leaves(cmd, (*prefix, name))
            else:
                yield " ".join((*prefix, name))

    covered = {c.command for c in CASES}
    assert set(leaves(get_command(app))) <= covered


# ------------------------------------------------------------------------------------------------ hypothesis

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SAMPLE = st.fixed_dictionaries(
    {"subject": st.text(min_size=0, max_size=10), "object": st.text(min_size=0, max_size=10)},
    optional={"extra": JSON_VALUES},
)
RELATION_FILES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(json.dumps),
    st.fixed_dictionaries(
        {
            "name": st.text(max_size=12) | JSON_VALUES,
            "prompt_templates": st.lists(st.text(max_size=20).map(lambda t: t + " {}"), max_size=3) | JSON_VALUES,
            "samples": st.lists(SAMPLE | JSON_VALUES, max_size=14),
        }
    ).map(json.dumps),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=RELATION_FILES)
def test_generated_relation_files_fail_with_one_line(content, inputs, tmp_path_factory, capfd):
    """Whatever a relation file holds, `relations find` on the tiny model (which knows no fact) ends with one line
    and exit code 2: the file's problem, or the knowledge gate."""
    work = tmp_path_factory.mktemp("hyp")
    path = work / "rel.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))

    def args(inputs: Inputs, out: Path) -> list[str]:
        return [*_relations_base("find", inputs, out), "--relations", "", "--relation-file", str(path)]

    with pytest.MonkeyPatch.context() as mp:
        run_case(Case("relations find", "generated", args, before=False), inputs, work, capfd, mp)
