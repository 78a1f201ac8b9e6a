"""Model organisms: small Llama LMs trained by engramlab on real facts, shipped as `organism:base` and
`organism:chat` (plain HF directories under `weights/`).

`corpus` (training text), `tokenizer` (byte-level BPE), `train` (nanoGPT-style loop with checkpoints),
`evaluate` (fact, TRUE/FALSE, language, chat and refusal numbers), `build` (the whole pipeline), `cli`
(`engramlab organisms build|eval|list`), `registry` (where shipped organisms live).
"""
