"""Real data for the studies and the model organisms, vendored with licences (see `vendor/*/SOURCE.md`).

- `facts`: relations (LRE, geography, Spanish words) with selection / heldout / unseen templates and disjoint
  select / eval subjects — `load_relation(name) -> Relation` (English; `multilingual.relation_in(name, language)`
  for de/es/fr).
- `multilingual`: de / es / fr renderings of the geography relations.
- `statements`: paper 3's few-shot TRUE/FALSE statements (facts and geometry-of-truth sets).
- `chat`: chat template, fact questions, harmless instructions, AdvBench refusals, the refusal-phrase list.
- `loaders`: JSON / CSV readers whose errors name the file and line.
"""

from engramlab.data.facts import (
    PAPER1_RELATIONS,
    RELATIONS,
    Fact,
    Prompt,
    Relation,
    Template,
    load_relation,
    load_relations,
)

__all__ = ["PAPER1_RELATIONS", "RELATIONS", "Fact", "Prompt", "Relation", "Template", "load_relation", "load_relations"]
