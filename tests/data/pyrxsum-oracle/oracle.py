"""Scores every PyrXSum system with Google's rouge-score and sacreBLEU, the oracles the toolkit's metrics
must match (issue 4). Writes JSON to stdout: per system, corpus-mean ROUGE-1/2/L/Lsum precision, recall
and F1 with and without the Porter stemmer, and corpus BLEU (sacreBLEU defaults: 13a, exp smoothing).

    pip install rouge-score sacrebleu
    python3 oracle.py ../shared/data/pyrxsum > scores.json

Where the packages cannot be installed, put checkouts on PYTHONPATH: google-research/rouge as package
`rouge` (the import below falls back to it) and mjpost/sacrebleu.
"""
import json
import os
import sys

try:
    from rouge_score import rouge_scorer
except ImportError:
    from rouge import rouge_scorer
import sacrebleu

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def main(root):
    refs = read_lines(os.path.join(root, "references.txt"))
    out = {}
    for name in sorted(os.listdir(os.path.join(root, "summaries"))):
        preds = read_lines(os.path.join(root, "summaries", name))
        assert len(preds) == len(refs), (name, len(preds), len(refs))
        record = {}
        for stem in (False, True):
            scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stem)
            sums = {t: [0.0, 0.0, 0.0] for t in TYPES}
            for ref, pred in zip(refs, preds):
                scores = scorer.score(ref, pred)
                for t in TYPES:
                    for i, v in enumerate(scores[t]):
                        sums[t][i] += v
            record["stemmed" if stem else "unstemmed"] = {
                t: {"precision": p / len(refs), "recall": r / len(refs), "f1": f / len(refs)}
                for t, (p, r, f) in sums.items()}
        record["bleu"] = sacrebleu.corpus_bleu(preds, [refs], force=True).score
        out[name.rsplit(".", 1)[0]] = record
    json.dump({"n": len(refs), "systems": out}, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
