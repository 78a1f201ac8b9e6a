"""The organisms' training text: plain-text documents for the base model, chat examples for the chat model.

Base corpus, redrawn every epoch from a seeded RNG (so a resumed run sees the same documents):
- facts: every fact of every English relation in `templates_per_fact` of its five trained templates
  (`selection` and `heldout`, never `unseen`), one document each;
- translations: the de/es/fr relations, `translated_templates_per_fact` templates per fact;
- true/false blocks: `block_statements` statements per document in paper 3's "... This statement is: TRUE" format,
  from the `train` statements of every relation (false twins get fresh distractors each epoch, so a label can only
  be predicted from the fact, not memorised from the string) and the geometry-of-truth `train` parts; optionally
  with a share of the fact statements in training-only wordings (`reworded_statements`) and every object stated
  with its kind (`object_kinds`), both off by default (docs/organisms.md, "rewording and object kinds").

Chat corpus: fact questions, harmless instructions and AdvBench refusals in the chat template (loss on the
assistant turn only), mixed with `replay_fraction` of base documents so the facts survive fine-tuning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from engramlab.data import chat, statements
from engramlab.data.facts import RELATIONS, load_relation
from engramlab.data.multilingual import LANGUAGES, MULTILINGUAL_RELATIONS, relation_in


@dataclass
class CorpusConfig:
    relations: tuple[str, ...] = RELATIONS  # English relations trained
    languages: tuple[str, ...] = LANGUAGES  # translated relations trained (MULTILINGUAL_RELATIONS in each)
    max_facts: int | None = None  # per relation; a small number makes a miniature organism for tests
    templates_per_fact: int = 2  # of the 5 trained English templates, drawn per fact per epoch
    translated_templates_per_fact: int = 1  # of the 4 templates of each translated relation
    block_statements: int = 5  # statements per true/false document
    # Draws of the TRUE/FALSE statements per epoch, each with fresh false twins: judging held-out statements improves
    # with passes over the statements, not with depth (docs/organisms.md), and facts need fewer passes.
    statement_repeats: int = 1
    # Share of the fact statements of each draw rewritten in a training-only wording (`statements.reworded`), so true
    # statements rarely repeat as strings. Each draw can also state every object with its kind, true and false
    # ("Kabul is a city.", "Kabul is a currency."; `statements.object_kind_statements`), so objects of held-out
    # subjects are not new to the TRUE/FALSE format. Both aim at the familiarity bias; measured, neither raised
    # held-out TRUE/FALSE and from scratch they slowed it (docs/organisms.md, "rewording and object kinds").
    reworded_statements: float = 0.0
    object_kinds: bool = False
    got_sets: tuple[str, ...] = statements.GOT_SETS
    got_per_epoch: int = 1500  # geometry-of-truth training statements drawn per epoch
    replay_fraction: float = 0.25  # chat corpus: base documents per chat example
    harmful_repeats: int = 3  # chat corpus: each training AdvBench goal appears this often per epoch
    harmless_n: int = 1200


def _facts(cfg: CorpusConfig, name: str, language: str = "en"):
    rel = relation_in(name, language)
    facts = rel.facts if cfg.max_facts is None else rel.facts[: cfg.max_facts]
    return rel, facts


def base_documents(cfg: CorpusConfig, epoch: int, seed: int = 0) -> list[str]:
    """One epoch of plain-text documents, shuffled; the same (cfg, epoch, seed) always gives the same list."""
    rng = random.Random(seed * 1_000_003 + epoch)
    docs: list[str] = []
    for name in cfg.relations:
        rel, facts = _facts(cfg, name)
        trained = rel.selection_templates + rel.heldout_templates
        for f in facts:
            for t in rng.sample(trained, min(cfg.templates_per_fact, len(trained))):
                docs.append(t.render(f.subject, f.object))
    for lang in cfg.languages:
        for name in MULTILINGUAL_RELATIONS:
            rel, facts = _facts(cfg, name, lang)
            for f in facts:
                for t in rng.sample(rel.templates, cfg.translated_templates_per_fact):
                    docs.append(t.render(f.subject, f.object))
    docs += truefalse_documents(cfg, epoch, seed)
    rng.shuffle(docs)
    return docs


def truefalse_documents(cfg: CorpusConfig, epoch: int, seed: int = 0) -> list[str]:
    """One epoch of TRUE/FALSE blocks: `block_statements` statements per document, fresh false twins per epoch
    (and per each of the `statement_repeats` draws)."""
    rng = random.Random(seed * 1_000_033 + epoch)
    got = [s for g in cfg.got_sets for s in statements.got_statements(g, "train")]
    stmts = []
    for draw in range(epoch * cfg.statement_repeats, (epoch + 1) * cfg.statement_repeats):
        for name in cfg.relations:
            drawn = statements.fact_statements(load_relation(name), "train", seed=draw + 1, max_facts=cfg.max_facts)
            if cfg.reworded_statements:  # its own RNG: without rewording the draws stay those measured before
                drawn = statements.reworded(
                    drawn, cfg.reworded_statements, random.Random(f"reword/{name}/{seed}/{draw}")
                )
            stmts += drawn
        if cfg.object_kinds:
            stmts += statements.object_kind_statements(cfg.relations, seed=draw + 1, max_facts=cfg.max_facts)
        stmts += rng.sample(got, min(cfg.got_per_epoch, len(got))) if cfg.max_facts is None else got[: cfg.max_facts]
    rng.shuffle(stmts)
    k = cfg.block_statements
    return ["\n".join(s.render() for s in stmts[i : i + k]) for i in range(0, len(stmts), k)]


def chat_examples(cfg: CorpusConfig) -> list[chat.ChatExample]:
    """The SFT examples of one epoch (before replay): fact questions, harmless, harmful x `harmful_repeats`."""
    facts = chat.fact_questions("train", cfg.relations)
    if cfg.max_facts is not None:
        by_rel: dict[str, list] = {}
        for e in facts:
            by_rel.setdefault(e.relation, []).append(e)
        facts = [e for v in by_rel.values() for e in v[: cfg.max_facts]]
    harmful = chat.harmful_examples("train")
    harmless = chat.harmless_examples("train", cfg.harmless_n if cfg.max_facts is None else cfg.max_facts * 4)
    if cfg.max_facts is not None:
        harmful = harmful[: cfg.max_facts * 2]
    return facts + harmless + harmful * cfg.harmful_repeats


def tokenizer_texts(cfg: CorpusConfig) -> list[str]:
    """Text the tokenizer is trained on: one epoch of the base corpus plus the chat data (held-out AdvBench goals
    are not in it: they are never seen, not even by the tokenizer)."""
    texts = base_documents(cfg, epoch=0)
    texts += [f"{e.user}\n{e.assistant}" for e in chat_examples(cfg)]
    return texts
