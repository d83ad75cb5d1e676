"""Every known departure of the local evaluation from OLMES (Gu et al., 2024), for reports."""
from __future__ import annotations

OLMES_DEPARTURES: list[str] = [
    "Engine: lm-eval 0.4.x (HFLM loglikelihoods) over local files, not the allenai/olmes "
    "package (optional engine='olmes' path shells out to it when installed).",
    "Items: 300 test items per task, a seeded subsample of each source split (100 more "
    "held out as 'val'); OLMES uses the full test/validation sets (ARC/OBQA/MMLU test, "
    "others validation), with up to 1000 sampled items for the largest sets.",
    "Sources: ARC, BoolQ, CommonsenseQA, OpenBookQA, PIQA, SIQA and WinoGrande come from "
    "MosaicML llm-foundry's local ICL files, HellaSwag from the lm-eval-style preprocessed "
    "validation set, MMLU from the original CSVs; not the HF datasets OLMES pins.",
    "SIQA has 2 answer options (llm-foundry's reduced version) instead of 3: chance is 50%.",
    "CommonsenseQA has 4 answer options (llm-foundry's reduced version) instead of 5: chance is 25%.",
    "CommonsenseQA and SIQA ship in MC letter format; their answer texts are parsed back "
    "out of the 'Choices:' block (A. ..., B. ...) to build the cloze (RC) prompts.",
    "Shots: 0-shot for all tasks except MMLU (5-shot: the 5 dev rows of the same subject, "
    "in file order); OLMES uses 5 curated shots for every task.",
    "Formulation: cloze (RC) only; OLMES also runs the MC formulation and keeps the better "
    "of the two (MC only helps models far larger than the ones trained here).",
    "Character normalization divides by the answer's length without the leading space "
    "(lm-eval acc_norm); OLMES counts the continuation as scored, including that space.",
    "PMI normalization subtracts ln P(answer | 'Answer:') like OLMES, but the unconditional "
    "term is computed by lm-eval's HFLM tokenization of the pair ('Answer:', ' answer').",
    "Prompts: PIQA uses 'Question: <goal>\\nAnswer:', BoolQ drops the 'Passage:' label and "
    "keeps the source's question casing/punctuation; HellaSwag uses the preprocessed "
    "'<activity>: <ctx>' query as shipped.",
    "MMLU is scored as one task over 300 items pooled across subjects (micro average), "
    "not the macro average over 57 subject tasks.",
    "Standard errors are lm-eval's closed-form binomial stderr of the mean over items.",
    "Scores are aggregated as a plain mean of the 10 task accuracies (percent), no "
    "chance-level rescaling.",
]
