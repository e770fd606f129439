"""SST-2: data2vec 2.0 text pretraining for a CPU budget on the SST-2 training sentences
(without labels), then fine-tuning (first-token tanh head) on 2,000 labelled training
sentences, against the same architecture from a random init under the same recipe and
epochs; accuracy on the 872 dev sentences. Baselines: a linear probe of frozen features and
a TF-IDF logistic regression on the same 2,000 sentences.

    python benchmarks/sst2.py --budget-minutes 5 --finetune-epochs 5 --threads 1 \\
        --out benchmarks/results/sst2 [--work /tmp/data2vec-bench/sst2]
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import common
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from data2vec.config import apply_overrides
from data2vec.data.eval_inputs import labelled_items
from data2vec.finetune import finetune_preset, read_labelled
from data2vec.presets import preset
from data2vec.pretrained import load_pretrained


def main() -> None:
    p = common.bench_parser(__doc__, "sst2", budget=5.0, epochs=5, lr=1e-4)
    p.add_argument("--labels", type=int, default=2000, help="labelled training sentences")
    args = p.parse_args()
    out, work, t_all = common.start(args)
    sst = common.DATA / "sst2"
    cfg = apply_overrides(
        preset("text-tiny", args.version),
        [
            f"data.path={sst / 'train.tsv'}",
            "data.text.tsv_column=sentence",
            "data.num_workers=0",
            "train.precision=bf16",
            "train.log_every=10",
            *args.overrides,
        ],
    )
    run_dir, pinfo = common.pretrain_or_reuse(cfg, args, work)
    algo = common.algorithm(run_dir)
    pre = load_pretrained(run_dir)

    lines = (sst / "train.tsv").read_text(encoding="utf-8").splitlines()
    labelled_tsv = work / f"train-{args.labels}.tsv"
    labelled_tsv.write_text("\n".join(lines[: args.labels + 1]) + "\n")
    ft = finetune_preset(
        "text_cls", epochs=args.finetune_epochs, lr=args.lr, batch_size=32, log_every=10, precision="bf16"
    )
    train_set = read_labelled(labelled_tsv, ft, pre.config)
    dev_set = read_labelled(sst / "dev.tsv", ft, pre.config, train_set.classes)
    test_set = read_labelled(sst / "test.tsv", ft, pre.config, train_set.classes)
    test_set.name = "SST-2 test"
    rows = common.compare_finetune(
        run_dir, ft, train_set, dev_set, work, args.seeds, args.ft_overrides, test_set, jobs=args.jobs
    )

    probe = common.probe_compare(run_dir, partial(labelled_items, pre.config), train_set, dev_set)

    def texts(path: Path, n: int | None = None) -> tuple[list[str], list[int]]:
        rows_ = [ln.split("\t") for ln in path.read_text(encoding="utf-8").splitlines()[1:]][:n]
        return [r[0] for r in rows_], [int(r[1]) for r in rows_]

    tr_x, tr_y = texts(sst / "train.tsv", args.labels)
    dv_x, dv_y = texts(sst / "dev.tsv")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(tr_x)
    te_x, te_y = texts(sst / "test.tsv")
    lr = LogisticRegression(max_iter=2000).fit(vec.transform(tr_x), tr_y)
    tfidf, tfidf_test = float(lr.score(vec.transform(dv_x), dv_y)), float(lr.score(vec.transform(te_x), te_y))
    print(f"TF-IDF logistic regression: dev {tfidf:.4f}, test {tfidf_test:.4f}")

    table = [
        (f"{algo} pretrained, fine-tuned", "dev accuracy", f"{rows['pretrained']['best']:.4f}"),
        ("same architecture from scratch, fine-tuned", "dev accuracy", f"{rows['scratch']['best']:.4f}"),
        (f"{algo} pretrained, fine-tuned", "test accuracy", f"{rows['pretrained']['test']:.4f}"),
        ("same architecture from scratch, fine-tuned", "test accuracy", f"{rows['scratch']['test']:.4f}"),
        (f"{algo} pretrained, linear probe", "dev accuracy", f"{probe['pretrained']:.4f}"),
        ("random init, linear probe", "dev accuracy", f"{probe['scratch']:.4f}"),
        (f"TF-IDF logistic regression ({args.labels} sentences)", "dev accuracy", f"{tfidf:.4f}"),
        (f"TF-IDF logistic regression ({args.labels} sentences)", "test accuracy", f"{tfidf_test:.4f}"),
        ("majority class", "dev accuracy", f"{max(np.mean(dv_y), 1 - np.mean(dv_y)):.4f}"),
    ]
    ft_min = {k: f"{v['seconds'] / 60:.1f}" for k, v in rows.items()}
    info = {
        "pretraining": f"{pinfo['steps']} steps x batch {pinfo['batch_size']} blocks of 128 tokens "
        f"in {pinfo['seconds'] / 60:.1f} min",
        "fine-tuning": f"{args.finetune_epochs} epochs, lr {args.lr}, on {len(train_set)} labelled sentences, "
        f"{ft_min['pretrained']} min (pretrained) / {ft_min['scratch']} min (scratch)",
        "dev sentences": len(dev_set),
        "margin (fine-tuned, pretrained - scratch)": f"{rows['pretrained']['best'] - rows['scratch']['best']:+.4f}",
        "margin (test, best-on-dev checkpoints)": f"{rows['pretrained']['test'] - rows['scratch']['test']:+.4f}",
        "margin (linear probe)": f"{probe['pretrained'] - probe['scratch']:+.4f}",
        **common.seeds_note(rows),
        **common.footer(args, t_all),
    }
    curves = {k: v["history"] for k, v in rows.items()}
    common.write_results(out, f"SST-2 (text-tiny, {algo})", table, info, curves)


if __name__ == "__main__":
    main()
