#!/usr/bin/env python
"""Training throughput: the bare step, the project's `Learner.fit` on each data path, and each data path alone.

All in one process and one run, so the ratios compare like with like on whatever machine runs it:

  (a) bare     the same model and losses (the paper recipe: cosine classifier + class-wise circle, batch-hard
               triplet, centre loss with its own SGD), PyTorch's fused Adam, bf16 autocast and channels-last on a
               GPU, on synthetic batches already on the device: what the hardware can do;
  (b) fit      `reid_learner(...).fit` on real data (Market-1501, else the demo data) with the cached path,
  (c)          and with the PIL path (`num_workers` loader processes);
  (d) data     each loader alone: one epoch's worth of batches, augmented, normalised, on the device;
  (e) overhead the loop's own cost per step: a tiny timm model on the same pre-built batches, a bare PyTorch loop
               vs `Learner.fit` with the project's callbacks, median of 3 (fit minus bare, in ms per step).

The table is printed, then one JSON line with the keys device, bare_img_s, fit_cached_img_s, fit_pil_img_s,
data_cached_img_s, data_pil_img_s, overhead_ms_per_step (and the rest). On a GPU the fit is also run under
`torch.cuda.set_sync_debug_mode('warn')` and the synchronising calls are listed by place (`sync_calls`).

  python benchmarks/throughput.py                              # the GPU, ResNet-50, 256x128, P16xK4
  python benchmarks/throughput.py --device cpu --quick         # a CPU check of the ratios (small model, about a minute)
  python benchmarks/throughput.py --out benchmarks/results/throughput_h100.json
"""
import argparse, collections, contextlib, datetime, json, os, statistics, sys, time, warnings
from functools import partial
from pathlib import Path

import torch

warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)  # fastai.layers, at import
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from a checkout without installing
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.torch_core import set_seed
from reid_fastai.data import market1501_df, market1501_path, reid_df
from reid_fastai.demo import make_demo_dataset
from reid_fastai.images import available_cpus
from reid_fastai.loaders import reid_dataloaders
from reid_fastai.learner import reid_learner
from reid_fastai.recipes import recipe_model, recipe_loss
from reid_fastai.provenance import device_name
from reid_fastai.callbacks import SkipValidation, ReIDEvalCallback, LossTermsRecorder, NaNStop, LeanLogging, CenterLossOptimizer


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def pk_labels(p, k, dev):
    return torch.arange(p, device=dev).repeat_interleave(k), torch.arange(p * k, device=dev) % 6


def bare_step_fn(model, loss, dev, amp):
    "One training step as a plain PyTorch loop would write it"
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3.5e-4, weight_decay=5e-4, fused=True)
    centers = loss.center_params()
    copt = torch.optim.SGD(centers, lr=0.5, fused=True) if centers else None
    def step(x, y, c):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
            total = loss(out, y, c)
        total.backward()
        for t in centers: t.grad.mul_(1 / 0.005)
        opt.step(); opt.zero_grad(set_to_none=True)
        if copt is not None: copt.step(); copt.zero_grad(set_to_none=True)
    return step


def time_bare(arch, n_classes, size, p, k, steps, dev, amp, channels_last, warmup=3):
    set_seed(0)
    model = recipe_model('paper', n_classes, arch=arch).to(dev).train()
    if channels_last: model = model.to(memory_format=torch.channels_last)
    loss = recipe_loss('paper', n_classes, model.feat_dim).to(dev)
    x = torch.randn(p * k, 3, *size, device=dev)
    if channels_last: x = x.contiguous(memory_format=torch.channels_last)
    y, c = pk_labels(p, k, dev)
    step = bare_step_fn(model, loss, dev, amp)
    for _ in range(warmup): step(x, y, c)
    sync(dev); t = time.perf_counter()
    for _ in range(steps): step(x, y, c)
    sync(dev)
    return p * k * steps / (time.perf_counter() - t)


class EpochTimer(Callback):
    "Wall time of each training phase (data loading included), synchronised with the device"
    order = 100
    def before_fit(self): self.times = []
    def before_train(self): sync(self.dls.device); self._t = time.perf_counter()
    def after_train(self): sync(self.dls.device); self.times.append(time.perf_counter() - self._t)


def shortened(dls, steps):
    "Epochs of `steps` batches (fastai's `n`), so a benchmark epoch is as long as asked"
    dls.train.n = steps * dls.train.bs
    return dls


def time_fit(dls, arch, steps, mp, epochs=2):
    "images/s of the project's learner (no evaluation), from the last of `epochs` epochs of `steps` batches"
    set_seed(0)
    learn = reid_learner(shortened(dls, steps), arch, 'paper', pretrained=False, mixed_precision=mp)
    learn.remove_cbs(learn._grab_cbs(ReIDEvalCallback)); learn.add_cbs([SkipValidation(), EpochTimer()])
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 3.5e-4)
    return dls.train.bs * steps / learn.epoch_timer.times[-1], learn


def time_data(dl, steps, dev, warmup=1):
    "images/s of a loader alone: batches drawn, augmented and normalised on the device"
    it = iter(dl)
    for _ in range(warmup): next(it)
    sync(dev); t, n = time.perf_counter(), 0
    for _ in range(steps):
        try: b = next(it)
        except StopIteration: it = iter(dl); b = next(it)
        n += len(b[0])
    sync(dev)
    return n / (time.perf_counter() - t)


def sync_calls(dls, arch, steps, mp):
    "The places of the synchronising CUDA calls during two short epochs of `fit` (driver's view)"
    seen = collections.Counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try: time_fit(dls, arch, steps, mp)
        finally: torch.cuda.set_sync_debug_mode(0)
    for x in w:
        if 'synchroniz' in str(x.message): seen[f"{Path(x.filename).parent.name}/{Path(x.filename).name}:{x.lineno}"] += 1
    return dict(seen.most_common())


class PrebuiltBatches(DataLoader):
    "A fastai `DataLoader` that yields the same pre-built batches (already on the device) every epoch"
    def __init__(self, batches, **kw): super().__init__(list(range(len(batches))), bs=1, **kw); self.batches = batches
    def create_batches(self, samps): yield from (self.batches[i] for i in samps)
    def __len__(self): return len(self.batches)


def overhead(dev, steps=20, arch='test_resnet', size=(64, 32), p=8, k=4, repeat=5):
    "ms/step of a bare loop and of `Learner.fit` (project callbacks) on the same pre-built batches, `repeat` interleaved pairs"
    n_classes = 32
    set_seed(0)
    batches = [(torch.randn(p * k, 3, *size, device=dev), *pk_labels(p, k, dev)) for _ in range(steps)]
    bare, fit = [], []
    for _ in range(repeat):
        set_seed(0)
        model = recipe_model('paper', n_classes, arch=arch).to(dev).train()
        loss = recipe_loss('paper', n_classes, model.feat_dim).to(dev)
        step = bare_step_fn(model, loss, dev, amp=False)
        step(*batches[0]); sync(dev); t = time.perf_counter()
        for b in batches: step(*b)
        sync(dev); bare.append((time.perf_counter() - t) / steps * 1e3)
        set_seed(0)
        model = recipe_model('paper', n_classes, arch=arch).to(dev).train()
        loss = recipe_loss('paper', n_classes, model.feat_dim).to(dev)
        dls = DataLoaders(PrebuiltBatches(batches), PrebuiltBatches(batches[:1]), device=dev)
        dls.n_inp = 1
        from reid_fastai.optim import reid_opt_func
        learn = Learner(dls, model, loss_func=loss, opt_func=reid_opt_func(), lr=3.5e-4, wd=5e-4,
                        cbs=[SkipValidation(), LossTermsRecorder(), NaNStop(), LeanLogging(), CenterLossOptimizer(), EpochTimer()])
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 3.5e-4)
        fit.append(learn.epoch_timer.times[-1] / steps * 1e3)
    return bare, fit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', help="dataset folder, or 'demo' (default: Market-1501 if found, else the demo data)")
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--quick', action='store_true', help='small model and few steps: a CPU check of the ratios')
    ap.add_argument('--arch', default=None, help='default resnet50 (--quick: test_resnet)')
    ap.add_argument('--size', type=int, nargs=2, default=[256, 128])
    ap.add_argument('--p', type=int, default=16)
    ap.add_argument('--k', type=int, default=4)
    ap.add_argument('--steps', type=int, default=None, help="batches per timed phase (default 100; --quick 3)")
    ap.add_argument('--workers', type=int, default=None, help='PIL path loader processes (default: its own default)')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: available cores)')
    ap.add_argument('--skip', nargs='*', default=[], choices=['bare', 'fit_cached', 'fit_pil', 'data', 'overhead', 'sync'])
    ap.add_argument('--out', help='also write the JSON record to this file')
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads or available_cpus())
    arch = a.arch or ('test_resnet' if a.quick else 'resnet50')
    steps = a.steps or (3 if a.quick else 100)
    data_steps = max(steps, 10)   # the loaders alone are cheap: time a few more batches
    size, amp = tuple(a.size), dev.type == 'cuda'
    mp = 'bf16' if amp else None
    data = None if a.data == 'demo' else (a.data or market1501_path())
    df = reid_df(data) if data else market1501_df(make_demo_dataset())
    source = str(data) if data else 'demo'
    n_classes = df[df.split == 'train'].pid.nunique()
    res = dict(device=device_name(dev), date=datetime.datetime.now().isoformat(timespec='seconds'), arch=arch,
               size=list(size), p=a.p, k=a.k, steps=steps, data=source, torch=torch.__version__,
               threads=torch.get_num_threads(), load_before=round(os.getloadavg()[0], 2))
    rows = []
    def row(name, v, ref=None):
        res[name] = round(v, 1) if v is not None else None
        rows.append((name, v, v / ref if (ref and v) else None))
    t0 = time.perf_counter()
    bare = time_bare(arch, n_classes, size, a.p, a.k, steps, dev, amp, dev.type == 'cuda') if 'bare' not in a.skip else None
    row('bare_img_s', bare)
    kw = dict(p=a.p, k=a.k, size=size, seed=0, device=dev)
    # on the CPU the PIL path runs in this one process by default (the CPU target compares the two paths in one process)
    workers = a.workers if a.workers is not None else (0 if dev.type == 'cpu' else None)
    res['pil_workers'] = workers
    dls = {pl: reid_dataloaders(df, pipeline=pl, num_workers=workers if pl == 'pil' else None, **kw) for pl in ('cached', 'pil')}
    for pl in ('cached', 'pil'):
        if f'fit_{pl}' in a.skip: row(f'fit_{pl}_img_s', None); continue
        v, _ = time_fit(dls[pl], arch, steps, mp)
        row(f'fit_{pl}_img_s', v, bare)
    if 'data' not in a.skip:   # short phases: alternate the two paths 5 times and keep each one's median
        runs = {pl: [] for pl in ('cached', 'pil')}
        for _ in range(5):
            for pl in runs: runs[pl].append(time_data(dls[pl].train, data_steps, dev))
        res['data_runs_img_s'] = {pl: [round(v, 1) for v in vs] for pl, vs in runs.items()}
    for pl in ('cached', 'pil'):
        row(f'data_{pl}_img_s', None if 'data' in a.skip else statistics.median(runs[pl]), bare)
    if res['data_pil_img_s'] and res['data_cached_img_s']: res['data_cached_over_pil'] = round(res['data_cached_img_s'] / res['data_pil_img_s'], 2)
    if res['fit_pil_img_s'] and res['fit_cached_img_s']: res['fit_cached_over_pil'] = round(res['fit_cached_img_s'] / res['fit_pil_img_s'], 2)
    if 'overhead' not in a.skip:
        with _threads(1): bare_ms, fit_ms = overhead(dev)
        diffs = sorted(f - b for b, f in zip(bare_ms, fit_ms))   # each pair ran back to back: the load is about the same
        res.update(overhead_bare_ms_per_step=round(statistics.median(bare_ms), 2), overhead_fit_ms_per_step=round(statistics.median(fit_ms), 2),
                   overhead_ms_per_step=round(statistics.median(diffs), 2), overhead_spread_ms=[round(diffs[0], 2), round(diffs[-1], 2)])
    if dev.type == 'cuda' and 'sync' not in a.skip: res['sync_calls'] = sync_calls(dls['cached'], arch, min(steps, 20), mp)
    res['seconds'] = round(time.perf_counter() - t0, 1)
    res['load_after'] = round(os.getloadavg()[0], 2)
    print(f"throughput on {res['device']} ({arch}, {size[0]}x{size[1]}, P{a.p}xK{a.k}, {steps} steps, data: {source})")
    print(f"{'':<18}{'images/s':>10}{'x bare':>9}")
    for name, v, r in rows: print(f"{name:<18}{'-' if v is None else round(v, 1):>10}{'' if r is None else f'{r:.2f}':>9}")
    if 'overhead_ms_per_step' in res:
        print(f"loop overhead (test_resnet 64x32, 1 thread, 5 pairs): bare {res['overhead_bare_ms_per_step']} ms/step, "
              f"fit {res['overhead_fit_ms_per_step']} ms/step, overhead {res['overhead_ms_per_step']} ms/step "
              f"(median of the pairs; spread {res['overhead_spread_ms'][0]} to {res['overhead_spread_ms'][1]})")
    if 'sync_calls' in res: print(f"synchronising CUDA calls in 2 x {min(steps, 20)} batches of fit: {res['sync_calls']}")
    line = json.dumps(res)
    print(line)
    if a.out: Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(json.dumps(res, indent=2) + '\n')
    return res


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads(); torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(old)


if __name__ == '__main__': main()
