"""The studies `test_distributed.py` runs once in one process and once under `torchrun --nproc_per_node 2`.

`python tests/distributed_worker.py OUT` (or the same under torchrun) writes, on rank 0, one folder per study into
OUT; the test compares the two runs' files. One launch covers every study, so torchrun's start-up (several seconds
on a busy 2-core machine) is paid once. Sizes are tiny but every sharded loop gets batches on both ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BATCH = 4  # small batches: every loop below has several, so both ranks work


def relations(out: Path) -> None:
    """find (AP over several column blocks, scored on both ranks), deactivate with random controls and the
    template control, and the perplexity probe."""
    import importlib

    from engramlab.relations import study

    find = importlib.import_module("engramlab.relations.find")  # the module, not the package's function `find`
    find.AP_BLOCK_ELEMENTS = 24 * 1000  # several column blocks, owned by alternating ranks
    opts = study.StudyOptions(
        model="organism:base",
        out=out / "relations",
        relations="country_capital,city_country",
        max_prompts=6,
        min_validated=3,  # 6 prompts per relation keep the run short; the default gate asks for 10
        k=20,
        eval_subjects=3,
        device="cpu",
        batch_size=BATCH,
        overwrite=True,
    )
    study.run_deactivate(opts, n_random=2, diagnose=True, top=10)
    perplexity_opts = study.StudyOptions(**{**vars(opts), "out": out / "perplexity", "neurons": out / "relations"})
    study.run_perplexity(perplexity_opts, n_random=1, max_objects=3)


def decode(out: Path) -> None:
    """decode atlas and decode compare, at a chunk size that gives each rank several chunks."""
    from engramlab.decode.atlas import decode_atlas, write_atlas
    from engramlab.decode.compare import compare_models, write_comparison
    from engramlab.models.loading import load_model

    base = load_model("organism:base", device="cpu")
    chat = load_model("organism:chat", device="cpu")
    write_atlas(decode_atlas(base, top_k=5, chunk_size=1000), out / "atlas", overwrite=True, explorer=False)
    write_comparison(compare_models(base, chat, top_k=5, chunk_size=1000), out / "compare", overwrite=True)


def posttrain(out: Path) -> None:
    """posttrain truth and refusal at small sizes (statement and prompt batches shared out; probes on gathered
    activations, mean differences summed in batch order); entropy (32 fixed texts, not sharded) is left out."""
    from engramlab.posttrain import study

    opts = study.Options(
        out=out / "posttrain",
        device="cpu",
        overwrite=True,
        batch_size=4,
        per_set=6,
        n_refusal_train=6,
        n_refusal_eval=6,
        max_new_tokens=3,
    )
    study.run(opts, ["truth", "refusal"])


def knowledge(out: Path) -> None:
    """posttrain knowledge: activation-patching pairs shared out (the slow part of posttrain compare)."""
    from engramlab.posttrain import study

    study.run(
        study.Options(out=out / "knowledge", device="cpu", overwrite=True, batch_size=64, max_pairs=2), ["knowledge"]
    )


def organisms(out: Path) -> None:
    """organisms eval's sharded loops on the base organism: fact recall (greedy), TRUE/FALSE scores, object
    log-probabilities and chat-template generations."""
    from engramlab.data import chat, statements
    from engramlab.organisms import evaluate
    from engramlab.organisms.build import load_organism
    from engramlab.organisms.registry import organism_path
    from engramlab.results import write_json

    model, tokenizer = load_organism(organism_path("organism:base"))
    held = statements.truefalse_heldout(per_relation=1)[:12]
    summary = {
        "fact_accuracy": evaluate.fact_accuracy(model, tokenizer, ("country_capital",), max_facts=10),
        "truefalse_scores": evaluate.truefalse_scores(model, tokenizer, held, batch_size=BATCH),
        "object_logprobs": evaluate.object_logprobs(model, tokenizer, held, batch_size=BATCH),
        "generations": evaluate.greedy(
            model, tokenizer, chat.advbench_split()[1][:6], max_new_tokens=4, batch_size=2, chat_template=True
        ),
    }
    write_json(out / "organism" / "summary.json", summary)


STUDIES = {
    "relations": relations,
    "decode": decode,
    "posttrain": posttrain,
    "organisms": organisms,
    "knowledge": knowledge,
}
FAST = ["relations", "decode", "posttrain", "organisms"]


def run(out: Path, names: list[str]) -> None:
    torch.manual_seed(0)
    for name in names:
        STUDIES[name](out)


def fail_on_rank1(out: Path) -> None:
    """`engramlab relations find` where rank 1 alone fails to load its model while rank 0 goes on into the first
    collective: rank 1 prints one line naming itself, torchrun stops rank 0."""
    from engramlab import cli, distributed
    from engramlab.errors import EngramError
    from engramlab.relations import study

    real = study.load_model

    def load_model(*args, **kwargs):
        if distributed.rank() == 1:
            raise EngramError("rank 1 cannot read its model.")
        return real(*args, **kwargs)

    study.load_model = load_model
    cli.main(["relations", "find", "--model", "organism:base", "--device", "cpu", "--out", str(out / "fail")])


if __name__ == "__main__":
    from engramlab import distributed

    distributed.init_from_env()
    target, what = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ",".join(FAST)
    if what == "fail_on_rank1":
        fail_on_rank1(target)
    try:
        run(target, what.split(","))
    finally:
        distributed.shutdown()
