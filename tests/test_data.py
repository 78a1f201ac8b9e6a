"""engramlab.data: relations, templates, splits, translations, statements, chat data and loader errors."""

from __future__ import annotations

import re

import pytest

from engramlab.data import chat, statements
from engramlab.data.facts import (
    FRAMES,
    PAPER1_RELATIONS,
    RELATIONS,
    load_relation,
    load_relations,
)
from engramlab.data.loaders import read_csv, read_json, read_json_records
from engramlab.data.multilingual import LANGUAGES, MULTILINGUAL_RELATIONS, relation_in, relations_in
from engramlab.errors import EngramError


@pytest.mark.parametrize("name", RELATIONS)
def test_relation_splits_and_templates(name):
    rel = load_relation(name)
    assert len(rel.facts) >= 150
    subjects = {f.subject for f in rel.facts}
    assert len(subjects) == len(rel.facts)  # duplicates dropped
    assert rel.select_subjects.isdisjoint(rel.eval_subjects)
    assert rel.select_subjects | rel.eval_subjects == subjects
    assert len(rel.eval_subjects) == min(50, len(subjects) // 5)
    assert len(rel.selection_templates) + len(rel.heldout_templates) >= 5
    assert {t.frame for t in rel.templates} == set(FRAMES)
    assert all("{}" in t.text for t in rel.templates)
    prompts = rel.prompts("eval", "heldout")
    assert len(prompts) == len(rel.eval_subjects) * len(rel.heldout_templates)
    assert all(p.subject in p.text and p.object not in p.text.replace(p.subject, "") for p in prompts[:20])


def test_paper1_relations_are_lre_sized():
    sizes = {n: len(load_relation(n).facts) for n in PAPER1_RELATIONS}
    assert all(s >= 290 for s in sizes.values())
    assert load_relation("company_ceo").templates[0].prompt("Alphabet") == "Question: Alphabet's CEO is? Answer:"


def test_no_prompt_is_a_prefix_of_another():
    """A statement prompt that starts a question prompt gets continued with "? Answer:" (docs/organisms.md)."""
    from engramlab.data.multilingual import LANGUAGES, MULTILINGUAL_RELATIONS, load_translated

    relations = list(load_relations().values())
    relations += [load_translated(n, lang) for lang in LANGUAGES for n in MULTILINGUAL_RELATIONS]
    for rel in relations:
        prompts = [t.prompt("Alphabet") for t in rel.templates]
        for a in prompts:
            assert not any(b != a and b.startswith(a) for b in prompts), (rel.name, rel.language, a)


def test_frame_words_are_shared_across_relations():
    """No frame word marks a relation: each frame's fixed words occur in every relation's template of that frame."""
    rels = load_relations()
    for frame, marker in (("p1", "Question: "), ("p1", "? Answer:"), ("p1b", "? Answer:"), ("qa", "Q: ")):
        assert all(marker in next(t.text for t in r.templates if t.frame == frame) for r in rels.values())


def test_split_is_stable_across_calls():
    a = load_relation("person_father").eval_subjects
    load_relation.cache_clear()
    assert load_relation("person_father").eval_subjects == a


@pytest.mark.parametrize("language", LANGUAGES)
def test_translated_relations(language):
    rels = relations_in(language)
    assert set(rels) == set(MULTILINGUAL_RELATIONS) and len(rels) >= 3
    cap = {f.subject: f.object for f in rels["country_capital"].facts}
    germany = {"de": "Deutschland", "es": "Alemania", "fr": "Allemagne"}[language]
    assert cap[germany] == "Berlin"
    en_eval = load_relation("country_capital").eval_subjects
    assert len(en_eval) - 2 <= len(rels["country_capital"].eval_subjects) <= len(en_eval)  # rare name clashes
    assert all(t.language == language for t in rels["country_capital"].templates)


def test_fact_statements_heldout_disjoint_and_minimal():
    rel = load_relation("company_hq")
    train, held = statements.truefalse_subjects(rel)
    assert train.isdisjoint(held)
    stmts = statements.fact_statements(rel, "heldout")
    assert {s.subject for s in stmts} <= held
    assert sum(s.label for s in stmts) * 2 == len(stmts)
    obj = {f.subject: f.object for f in rel.facts}
    for s in stmts[:40]:
        assert (obj[s.subject] in s.text) == s.label


@pytest.mark.parametrize("name", ["country_capital", "person_occupation", "landmark_on_continent"])
def test_train_statements_give_no_object_a_label(name):
    """False twins of training statements reuse the train facts' objects, shuffled: an object is as often in a TRUE
    as in a FALSE statement, and objects only held-out subjects have never appear (they used to, in FALSE ones only)."""
    rel = load_relation(name)
    train, _ = statements.truefalse_subjects(rel)
    train_objects = sorted({f.object for f in rel.facts if f.subject in train}, key=len, reverse=True)
    counts = {True: {}, False: {}}
    for s in statements.fact_statements(rel, "train", seed=1):
        obj = next(o for o in train_objects if s.text.endswith(f" {o}."))  # StopIteration: not a train object
        counts[s.label][obj] = counts[s.label].get(obj, 0) + 1
    unbalanced = sum(abs(n - counts[False].get(o, 0)) for o, n in counts[True].items())
    if name == "landmark_on_continent":  # Antarctica is the object of 74% of the facts: it cannot be balanced
        assert counts[False].get("Antarctica", 0) < counts[True]["Antarctica"]
    else:
        assert unbalanced <= 0.02 * sum(counts[True].values())


def test_object_group_of_heldout_statements():
    """In a one-to-one relation the true object of a held-out subject belongs to held-out subjects only; in a
    many-to-one relation (continents) every held-out object is also a training subject's object."""
    groups = {
        name: [
            statements.object_group(s) for s in statements.fact_statements(load_relation(name), "heldout") if s.label
        ]
        for name in ("country_capital", "landmark_on_continent")
    }
    assert groups["country_capital"].count("heldout_only") > 0.95 * len(groups["country_capital"])
    assert set(groups["landmark_on_continent"]) == {"true_in_training"}
    train_stmt = statements.fact_statements(load_relation("country_capital"), "train")[0]
    assert train_stmt.label and statements.object_group(train_stmt) == "true_in_training"
    assert train_stmt.text.endswith(f" {train_stmt.object}.")
    assert statements.object_group(statements.got_statements("cities")[0]) == ""


def test_default_shots_are_true_training_statements():
    for shot in statements.default_shots():
        rel = load_relation(shot.source)
        train, _ = statements.truefalse_subjects(rel)
        truth = {f.subject: f.object for f in rel.facts}
        assert shot.subject in train and shot.text.endswith(f" {shot.object}.")
        assert (truth[shot.subject] == shot.object) == shot.label


def test_truefalse_prompt_format():
    q = statements.truefalse_heldout(("country_capital",), per_relation=1)[0]
    prompt = statements.truefalse_prompt(q)
    lines = prompt.split("\n")
    assert len(lines) == 5
    assert [ln.rsplit(" ", 1)[1] for ln in lines[:4]].count("TRUE") == 2
    assert lines[-1] == q.text + " This statement is:"


def test_got_sets_split_by_city():
    train = {s.subject for s in statements.got_statements("cities", "train")}
    held = {s.subject for s in statements.got_statements("cities", "heldout")}
    assert train and held and train.isdisjoint(held)


def test_chat_data_splits():
    tr, te = chat.advbench_split()
    assert len(tr) + len(te) == 521 and len(te) == 104 and not set(tr) & set(te)  # the CSV holds 521 goals
    assert tr == chat.advbench_split()[0]  # fixed seed
    assert all(chat.is_refusal(e.assistant) for e in chat.harmful_examples("train")[:20])
    harmless_tr, harmless_te = chat.harmless_examples("train"), chat.harmless_examples("heldout", 100)
    assert len(harmless_te) == 100 and not {e.user for e in harmless_tr} & {e.user for e in harmless_te}
    assert not any(chat.is_refusal(e.assistant) for e in harmless_tr)
    qa = chat.fact_questions("heldout", ("country_capital",))
    assert qa and all(e.assistant == e.gold + "." for e in qa)


def test_is_refusal():
    assert chat.is_refusal("  I'm sorry, but no.")
    assert chat.is_refusal("I can’t do that")
    assert not chat.is_refusal("Paris.")


def test_missing_file(tmp_path):
    with pytest.raises(EngramError, match=re.escape(str(tmp_path / "nope.json"))):
        read_json(tmp_path / "nope.json")


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "rel.json"
    p.write_text(
        '{\n  "samples": [\n    {"subject": "a", "object": "b"},\n    {"subject": "c" "object": "d"}\n  ]\n}\n'
    )
    with pytest.raises(EngramError, match=re.escape(f"{p}:4:")) as err:
        read_json(p)
    assert "\n" not in str(err.value)


def test_json_record_missing_field_names_line(tmp_path):
    p = tmp_path / "rel.json"
    p.write_text('{"name": "x",\n "samples": [\n  {"subject": "a", "object": "b"},\n\n  {"subject": "c"}\n ]}\n')
    with pytest.raises(EngramError, match=re.escape(f"{p}:5:") + ".*'object'"):
        read_json_records(p, "samples", ("subject", "object"))


def test_malformed_csv_row_names_file_and_line(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text('statement,label\n"A is B.",1\n"C is D.",1,extra\n')
    with pytest.raises(EngramError, match=re.escape(f"{p}:3:")):
        read_csv(p, ("statement", "label"), "label")
    p.write_text('statement,label\n"A is B.",1\n"C is D.",yes\n')
    with pytest.raises(EngramError, match=re.escape(f"{p}:3:") + ".*0 or 1"):
        read_csv(p, ("statement", "label"), "label")
    p.write_text("statement\nA.\n")
    with pytest.raises(EngramError, match=re.escape(f"{p}:1:") + ".*label"):
        read_csv(p, ("statement", "label"))


def test_unknown_names_list_choices():
    with pytest.raises(EngramError, match="company_ceo"):
        load_relation("nope")
    with pytest.raises(EngramError, match="de, es, fr"):
        relation_in("country_capital", "it")
