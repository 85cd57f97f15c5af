#!/usr/bin/env python
"""Smoke test of a (GPU) machine for this project, in about a minute: what must work before any measurement is worth
the machine's time.

  1. imports and versions: python, torch (CUDA, cuDNN), torchvision, timm, numpy, fastai, fastcore, PIL, and where
     fastai comes from (on the GPU machine: the carried wheels);
  2. one training step of the paper recipe as `reid_train` runs it on a GPU: the demo data on the cached path with
     the decoded images resident on the GPU, bf16 autocast, PyTorch's fused Adam; the loss must be finite and the
     weights must move;
  3. a 2-epoch `reid_train` run on the demo data with the EfficientNet-Lite0 ImageNet weights (`pretrained='lite0'`,
     staged by the kit), evaluated at the end.

Each part is recorded in `--out` (JSON, rewritten after each part); a failing part records its error and the next
one runs. Exit status 0 only if all three passed.

  python benchmarks/gpu_smoke.py --device cuda --out $OUT/smoke.json
  python benchmarks/gpu_smoke.py --device cpu --size 64 32          # the same on the CPU (no bf16)
"""
import argparse, datetime, json, platform, sys, time, traceback, warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)


def part_versions(res, dev):
    import torch, torchvision, timm, numpy, PIL, fastai, fastcore
    res.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               torchvision=torchvision.__version__, timm=timm.__version__, numpy=numpy.__version__, pillow=PIL.__version__,
               fastai=fastai.__version__, fastcore=fastcore.__version__, fastai_from=str(Path(fastai.__file__).parent.parent),
               device=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f"CPU {platform.machine()}",
               bf16=bool(dev.type == 'cuda' and torch.cuda.is_bf16_supported()))
    import reid_fastai.learner, reid_fastai.train, reid_fastai.model_io, reid_fastai.model_eval, reid_fastai.gallery, reid_fastai.cli   # the package imports with these versions
    return dict(ok=True)


def part_step(res, dev, size, runs):
    "One fit step: cached path resident on `dev`, bf16 on CUDA, fused Adam; finite loss, weights moved"
    import torch
    from fastai.torch_core import set_seed
    from reid_fastai.data import reid_df
    from reid_fastai.demo import make_demo_dataset
    from reid_fastai.loaders import reid_dataloaders
    from reid_fastai.learner import reid_learner
    from reid_fastai.recipes import get_recipe
    from reid_fastai.callbacks import ReIDEvalCallback, SkipValidation
    set_seed(0, reproducible=True)
    dls = reid_dataloaders(reid_df(make_demo_dataset(runs/'demo_small', n_ids=16)), p=4, k=4, size=size, seed=0, device=dev,
                           pipeline='cached', cache_dir=runs/'cache', **get_recipe('paper').data)
    images = dls.train.dataset.images
    learn = reid_learner(dls, 'resnet50', 'paper', pretrained='none', mixed_precision='bf16' if dev.type == 'cuda' else None)
    learn.remove_cbs(learn._grab_cbs(ReIDEvalCallback)); learn.add_cb(SkipValidation())
    dls.train.n = dls.train.bs   # one batch
    w0 = [q.detach().clone() for q in learn.model.parameters()]
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 3.5e-4)
    if dev.type == 'cuda': torch.cuda.synchronize()
    opt = learn.opt.opt if hasattr(learn.opt, 'opt') else learn.opt
    loss = float(learn.recorder.losses[-1]) if learn.recorder.losses else float('nan')
    out = dict(images_on=str(images.device), pipeline=dls.pipeline, optimizer=type(opt).__name__,
               fused=bool(getattr(opt, 'defaults', {}).get('fused')), mixed_precision='bf16' if dev.type == 'cuda' else None,
               loss=round(loss, 4), weights_moved=sum(not torch.equal(q0, q) for q0, q in zip(w0, learn.model.parameters())) > len(w0) // 2, seconds=round(time.perf_counter() - t, 1))
    out['ok'] = (out['images_on'].startswith(dev.type) and out['fused'] and out['weights_moved'] and loss == loss and abs(loss) < 1e4)
    return out


def part_demo(res, dev, runs):
    "`reid_train` on the demo data for 2 epochs, Lite0 ImageNet weights from the kit, evaluated at the last epoch"
    from reid_fastai.train import reid_train
    t = time.perf_counter()
    r = reid_train(out=str(runs/'demo'), epochs=2, eval_every=1, pipeline='cached', device=str(dev), quiet=True, checkpoint_every=2)
    out = {k: r.get(k) for k in ('R1', 'mAP', 'mINP', 'epochs', 'images_per_s', 'weights')}
    out.update(seconds=round(time.perf_counter() - t, 1), ok=r.get('epochs') == 2 and r.get('R1') is not None and 'lite0' in str(r.get('weights')))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda if available)")
    ap.add_argument('--size', type=int, nargs=2, default=[128, 64], help='image size of the one-step test')
    ap.add_argument('--runs', default='/tmp/reid_kit/runs', help='where the demo data and runs go')
    ap.add_argument('--out', default=None, help='JSON record, rewritten after each part')
    ap.add_argument('--commit', default=None)
    a = ap.parse_args(argv)
    import torch
    dev = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    runs = Path(a.runs); runs.mkdir(parents=True, exist_ok=True)
    res = dict(date=datetime.datetime.now().isoformat(timespec='seconds'), commit=a.commit,
               command=' '.join(['python', 'benchmarks/gpu_smoke.py'] + list(sys.argv[1:] if argv is None else argv)))
    parts = [('versions', lambda: part_versions(res, dev)), ('step', lambda: part_step(res, dev, tuple(a.size), runs)),
             ('demo', lambda: part_demo(res, dev, runs))]
    for name, fn in parts:
        t = time.perf_counter()
        try: res[name] = fn()
        except Exception as e:
            res[name] = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}", where=traceback.format_exc(limit=-3)[-1500:])
        print(f"smoke {name}: {'ok' if res[name].get('ok') else 'FAILED'} ({time.perf_counter() - t:.1f}s) {json.dumps(res[name], default=str)}", flush=True)
        if name == 'versions':
            print('smoke versions: ' + ', '.join(f"{k} {res.get(k)}" for k in ('python', 'torch', 'cuda', 'cudnn', 'torchvision', 'timm', 'numpy',
                                                                               'fastai', 'fastcore', 'device', 'fastai_from')), flush=True)
        if a.out: Path(a.out).write_text(json.dumps(res, indent=2, default=str) + '\n')
    ok = all(res[n].get('ok') for n, _ in parts)
    print(f"smoke: {'ALL OK' if ok else 'FAILED: ' + ', '.join(n for n, _ in parts if not res[n].get('ok'))}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == '__main__': main()
