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

Measured as training runs: the recipe's own augmentation (`--recipe`, default paper: AutoAugment on 10% of the
images, random erasing 0.5), the cuDNN settings of `reid_train` (`set_seed(seed, reproducible=True)`: deterministic
kernels, no autotuning), and each timing inside one epoch (from the `--skip-batches`-th batch to the last of the
epoch: no epoch start or end in it). Each figure is printed and written to `--out` as soon as it is measured, and a
measurement that fails records its error and lets the next one run: a run killed at a time limit loses nothing
already measured.

The table is printed, then one JSON line with the keys device, bare_img_s, fit_cached_img_s, fit_pil_img_s,
data_cached_img_s, data_pil_img_s, overhead_ms_per_step (and the rest). On a GPU the fit is also run under
`torch.cuda.set_sync_debug_mode('warn')` and the synchronising calls are listed by place (`sync_calls`); `--compile`
adds the bare step and the cached-path fit under `torch.compile`.

  python benchmarks/throughput.py                              # the GPU, ResNet-50, 256x128, P16xK4
  python benchmarks/throughput.py --device cpu --quick         # a CPU check of the ratios (resnet18 at 64x32, about a minute)
  python benchmarks/throughput.py --out benchmarks/results/throughput_h100.json
"""
import argparse, collections, contextlib, datetime, json, os, statistics, sys, time, warnings
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
from reid_fastai.recipes import get_recipe
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


def time_bare(arch, n_classes, size, p, k, steps, dev, amp, channels_last, warmup=3, compile=False, recipe='paper'):
    set_seed(0, reproducible=True)   # as `reid_train`: deterministic cuDNN, no autotuning
    model = recipe_model(recipe, n_classes, arch=arch).to(dev).train()
    if channels_last: model = model.to(memory_format=torch.channels_last)
    if compile: model.compile()
    loss = recipe_loss(recipe, n_classes, model.feat_dim).to(dev)
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


class InEpochTimer(Callback):
    "images/s of each epoch from its `skip`-th batch to its last: inside the epoch, no epoch boundary in the timing"
    order = 100
    def __init__(self, skip:int=2): self.skip = skip
    def before_fit(self): self.rates = []
    def after_batch(self):
        if not self.training: return
        if self.iter == self.skip - 1: sync(self.dls.device); self._t, self._n = time.perf_counter(), 0
        elif self.iter >= self.skip: self._n += len(self.learn.xb[0])
        if self.iter == self.n_iter - 1 and self.iter >= self.skip:
            sync(self.dls.device); self.rates.append(self._n / (time.perf_counter() - self._t))


def shortened(dls, steps):
    "Epochs of `steps` batches (fastai's `n`), so a benchmark epoch is as long as asked"
    dls.train.n = steps * dls.train.bs
    return dls


def time_fit(dls, arch, steps, mp, epochs=2, skip=2, compile=False, recipe='paper'):
    "images/s of the project's learner (no evaluation) inside the last of `epochs` epochs of `steps` + `skip` batches"
    set_seed(0, reproducible=True)
    learn = reid_learner(shortened(dls, steps + skip), arch, recipe, pretrained=False, mixed_precision=mp, compile=compile)
    learn.remove_cbs(learn._grab_cbs(ReIDEvalCallback)); learn.add_cbs([SkipValidation(), InEpochTimer(skip)])
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 3.5e-4)
    return learn.in_epoch_timer.rates[-1], learn


def time_data(dl, steps, dev, warmup=1):
    "images/s of a loader alone: batches drawn, augmented and normalised on the device, inside one epoch"
    steps = min(steps, len(dl) - warmup)   # no epoch boundary (a new iterator, new workers) inside the timing
    if steps < 1: raise ValueError(f"an epoch of {len(dl)} batches leaves none to time after {warmup} warm-up batch(es)")
    it = iter(dl)
    for _ in range(warmup): next(it)
    sync(dev); t, n = time.perf_counter(), 0
    for _ in range(steps): n += len(next(it)[0])
    sync(dev)
    return n / (time.perf_counter() - t)


def sync_calls(dls, arch, steps, mp, recipe='paper'):
    "The places of the synchronising CUDA calls during two short epochs of `fit` (driver's view)"
    seen = collections.Counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try: time_fit(dls, arch, steps, mp, recipe=recipe)
        finally: torch.cuda.set_sync_debug_mode(0)
    for x in w:
        if 'synchroniz' in str(x.message): seen[f"{Path(x.filename).parent.name}/{Path(x.filename).name}:{x.lineno}"] += 1
    return dict(seen.most_common())


class PrebuiltBatches(DataLoader):
    "A fastai `DataLoader` that yields the same pre-built batches (already on the device) every epoch"
    def __init__(self, batches, **kw): super().__init__(list(range(len(batches))), bs=1, **kw); self.batches = batches
    def create_batches(self, samps): yield from (self.batches[i] for i in samps)
    def __len__(self): return len(self.batches)


def overhead(dev, steps=20, arch='resnet18', size=(64, 32), p=8, k=4, repeat=5):
    "ms/step of a bare loop and of `Learner.fit` (project callbacks) on the same pre-built batches, `repeat` interleaved pairs"
    n_classes = 32
    set_seed(0)
    batches = [(torch.randn(p * k, 3, *size, device=dev), *pk_labels(p, k, dev)) for _ in range(steps)]
    bare, fit = [], []
    for _ in range(repeat):
        set_seed(0, reproducible=True)
        model = recipe_model('paper', n_classes, arch=arch).to(dev).train()
        loss = recipe_loss('paper', n_classes, model.feat_dim).to(dev)
        step = bare_step_fn(model, loss, dev, amp=False)
        step(*batches[0]); sync(dev); t = time.perf_counter()
        for b in batches[1:]: step(*b)   # the same batches as the fit's timing: 1 .. steps-1 of an epoch
        sync(dev); bare.append((time.perf_counter() - t) / (steps - 1) * 1e3)
        set_seed(0, reproducible=True)
        model = recipe_model('paper', n_classes, arch=arch).to(dev).train()
        loss = recipe_loss('paper', n_classes, model.feat_dim).to(dev)
        dls = DataLoaders(PrebuiltBatches(batches), PrebuiltBatches(batches[:1]), device=dev)
        dls.n_inp = 1
        from reid_fastai.optim import reid_opt_func
        learn = Learner(dls, model, loss_func=loss, opt_func=reid_opt_func(), lr=3.5e-4, wd=5e-4,
                        cbs=[SkipValidation(), LossTermsRecorder(), NaNStop(), LeanLogging(), CenterLossOptimizer(), InEpochTimer(1)])
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 3.5e-4)
        fit.append(p * k / learn.in_epoch_timer.rates[-1] * 1e3)
    return bare, fit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', help="dataset folder, or 'demo' (default: Market-1501 if found, else the demo data)")
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--quick', action='store_true', help='small model and sizes, few steps: a CPU check of the ratios')
    ap.add_argument('--arch', default=None, help='default resnet50 (--quick: resnet18)')
    ap.add_argument('--recipe', default='paper', help="the recipe whose model, loss and augmentation are timed")
    ap.add_argument('--size', type=int, nargs=2, default=None, help='default 256 128 (--quick: 64 32)')
    ap.add_argument('--p', type=int, default=16)
    ap.add_argument('--k', type=int, default=4)
    ap.add_argument('--steps', type=int, default=None, help="batches per timed phase (default 100; --quick 3)")
    ap.add_argument('--skip-batches', type=int, default=2, help='batches at the start of an epoch left out of each fit timing')
    ap.add_argument('--workers', type=int, default=None, help='PIL path loader processes (default: its own default)')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: available cores)')
    ap.add_argument('--compile', action='store_true', help='also time the bare step and the cached-path fit under torch.compile')
    ap.add_argument('--skip', nargs='*', default=[], choices=['bare', 'fit_cached', 'fit_pil', 'data', 'overhead', 'sync'])
    ap.add_argument('--out', help='also write the JSON record to this file (rewritten after every measurement)')
    ap.add_argument('--commit', default=None, help='git commit to record (default: the checkout\'s, where git works)')
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads or available_cpus())
    arch = a.arch or ('resnet18' if a.quick else 'resnet50')
    steps = a.steps or (3 if a.quick else 100)
    data_steps = max(steps, 10)   # the loaders alone are cheap: time a few more batches
    size, amp = tuple(a.size or ((64, 32) if a.quick else (256, 128))), dev.type == 'cuda'
    mp = 'bf16' if amp else None
    data = None if a.data == 'demo' else (a.data or market1501_path())
    df = reid_df(data) if data else market1501_df(make_demo_dataset())
    source = str(data) if data else 'demo'
    n_classes = df[df.split == 'train'].pid.nunique()
    flags = dict(get_recipe(a.recipe).data)   # the recipe's augmentation (paper: AutoAugment on 10% of the images)
    from reid_fastai.provenance import git_commit
    res = dict(device=device_name(dev), date=datetime.datetime.now().isoformat(timespec='seconds'),
               command=' '.join(['python', 'benchmarks/throughput.py'] + list(sys.argv[1:] if argv is None else argv)),
               commit=a.commit or git_commit(), arch=arch, recipe=a.recipe, augmentation=flags, size=list(size), p=a.p, k=a.k,
               steps=steps, skip_batches=a.skip_batches, data=source, torch=torch.__version__,
               cudnn=dict(deterministic=True, benchmark=False), threads=torch.get_num_threads(),
               load_before=round(os.getloadavg()[0], 2))
    rows = []
    def save():
        if a.out: Path(a.out).parent.mkdir(parents=True, exist_ok=True); Path(a.out).write_text(json.dumps(res, indent=2) + '\n')
    def row(name, v, ref=None):
        res[name] = round(v, 1) if v is not None else None
        rows.append((name, v, v / ref if (ref and v) else None))
        if v is not None: print(f"{name:<24}{round(v, 1):>10} images/s" + (f"  ({v / ref:.2f} x bare)" if ref else ''), flush=True)
        save()
    def measure(name, fn):
        "Run one measurement; a failure is recorded (and printed) and the next one still runs"
        try: return fn()
        except Exception as e:
            res[f'{name}_error'] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{name}: FAILED {res[f'{name}_error']}", flush=True); save()
            return None
    t0 = time.perf_counter()
    tp = dict(steps=steps, dev=dev, amp=amp, channels_last=dev.type == 'cuda', recipe=a.recipe)
    bare = measure('bare', lambda: time_bare(arch, n_classes, size, a.p, a.k, **tp)) if 'bare' not in a.skip else None
    row('bare_img_s', bare)
    kw = dict(p=a.p, k=a.k, size=size, seed=0, device=dev, **flags)
    # on the CPU the PIL path runs in this one process by default (the CPU target compares the two paths in one process)
    workers = a.workers if a.workers is not None else (0 if dev.type == 'cpu' else None)
    res['pil_workers'] = workers
    dls = {}
    for pl in ('cached', 'pil'):
        dls[pl] = measure(f'dls_{pl}', lambda: reid_dataloaders(df, pipeline=pl, num_workers=workers if pl == 'pil' else None, **kw))
    fit_kw = dict(skip=a.skip_batches, recipe=a.recipe)
    v = measure('fit_cached', lambda: time_fit(dls['cached'], arch, steps, mp, **fit_kw)[0]) if dls['cached'] and 'fit_cached' not in a.skip else None
    row('fit_cached_img_s', v, bare)
    if dev.type == 'cuda' and 'sync' not in a.skip and dls['cached']:
        res['sync_calls'] = measure('sync', lambda: sync_calls(dls['cached'], arch, min(steps, 20), mp, recipe=a.recipe)); save()
        print(f"synchronising CUDA calls in 2 x {min(steps, 20)} batches of fit: {res['sync_calls']}", flush=True)
    v = measure('fit_pil', lambda: time_fit(dls['pil'], arch, steps, mp, **fit_kw)[0]) if dls['pil'] and 'fit_pil' not in a.skip else None
    row('fit_pil_img_s', v, bare)
    if 'data' not in a.skip and dls['cached'] and dls['pil']:   # short phases: alternate the two paths 5 times and keep each one's median
        def data_runs():
            runs = {pl: [] for pl in ('cached', 'pil')}
            for _ in range(5):
                for pl in runs: runs[pl].append(time_data(dls[pl].train, data_steps, dev))
            return runs
        runs = measure('data', data_runs)
        if runs:
            res['data_runs_img_s'] = {pl: [round(v, 1) for v in vs] for pl, vs in runs.items()}
            for pl in ('cached', 'pil'): row(f'data_{pl}_img_s', statistics.median(runs[pl]), bare)
    if res.get('data_pil_img_s') and res.get('data_cached_img_s'): res['data_cached_over_pil'] = round(res['data_cached_img_s'] / res['data_pil_img_s'], 2)
    if res.get('fit_pil_img_s') and res.get('fit_cached_img_s'): res['fit_cached_over_pil'] = round(res['fit_cached_img_s'] / res['fit_pil_img_s'], 2)
    if 'overhead' not in a.skip:
        def ovh():
            with _threads(1): return overhead(dev)
        o = measure('overhead', ovh)
        if o:
            bare_ms, fit_ms = o
            diffs = sorted(f - b for b, f in zip(bare_ms, fit_ms))   # each pair ran back to back: the load is about the same
            res.update(overhead_bare_ms_per_step=round(statistics.median(bare_ms), 2), overhead_fit_ms_per_step=round(statistics.median(fit_ms), 2),
                       overhead_ms_per_step=round(statistics.median(diffs), 2), overhead_spread_ms=[round(diffs[0], 2), round(diffs[-1], 2)])
            print(f"loop overhead (resnet18 64x32, 1 thread, 5 pairs): bare {res['overhead_bare_ms_per_step']} ms/step, "
                  f"fit {res['overhead_fit_ms_per_step']} ms/step, overhead {res['overhead_ms_per_step']} ms/step "
                  f"(median of the pairs; spread {res['overhead_spread_ms'][0]} to {res['overhead_spread_ms'][1]})", flush=True)
            save()
    if a.compile:
        v = measure('bare_compiled', lambda: time_bare(arch, n_classes, size, a.p, a.k, compile=True, **tp))
        row('bare_compiled_img_s', v, bare)
        v = measure('fit_cached_compiled', lambda: time_fit(dls['cached'], arch, steps, mp, compile=True, **fit_kw)[0]) if dls['cached'] else None
        row('fit_cached_compiled_img_s', v, bare)
    res['seconds'] = round(time.perf_counter() - t0, 1)
    res['load_after'] = round(os.getloadavg()[0], 2)
    print(f"throughput on {res['device']} ({arch}, {size[0]}x{size[1]}, P{a.p}xK{a.k}, {steps} steps, data: {source})")
    print(f"{'':<26}{'images/s':>10}{'x bare':>9}")
    for name, v, r in rows: print(f"{name:<26}{'-' if v is None else round(v, 1):>10}{'' if r is None else f'{r:.2f}':>9}")
    print(json.dumps(res), flush=True)
    save()
    return res


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads(); torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(old)


if __name__ == '__main__': main()
