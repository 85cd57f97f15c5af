"""Multi-process checks of `reid_fastai.distributed`, run by tests/test_ddp.py under
`torchrun --standalone --nproc_per_node 2 tests/ddp_checks.py --data DEMO --out OUT` (CPU, gloo).

Each check runs on every rank (the collectives need them all), compares what the ranks hold and a single-process
computation, raises on a mismatch and leaves its numbers in OUT/checks.json (rank 0)."""
import argparse, copy, json, math, os, signal, time, warnings
from pathlib import Path

import torch
from torch import nn
import torch.distributed as dist

torch.set_num_threads(1)
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from reid_fastai.losses import ReIDLoss, TripletLoss, CenterLoss, CameraBias, VerificationLoss
from fastai.torch_core import rank_distrib, num_distrib
from reid_fastai.callbacks import (CenterLossOptimizer, CameraBiasSchedule, NaNStop, SkipValidation, TimeBudget, camera_biases,
                                   fit_warmup_multistep)
from reid_fastai.checkpoint import ReIDCheckpoint, resume_from
from reid_fastai.optim import reid_opt_func
from reid_fastai.models import ReIDNet
from reid_fastai.data import reid_df
from reid_fastai.loaders import reid_dataloaders
from reid_fastai.evaluation import evaluate_reid
from reid_fastai.distributed import setup_distributed, distributed_context, distributed_evaluate

RESULTS = {}


def gather(obj):
    "`obj` of every rank, in rank order, on every rank"
    res = [None] * num_distrib()
    dist.all_gather_object(res, obj)
    return res


class Lin(nn.Module):
    "A linear embedding with the `ReIDNet` output protocol: per-sample, so the global batch is the concatenation of the ranks'"
    def __init__(self, n_in=6, dim=5):
        super().__init__()
        self.body = nn.Linear(n_in, dim)
    def forward(self, x):
        f = self.body(x)
        return dict(feat=f, neck_feat=f) if self.training else f


def per_rank_dls(batches):
    "fastai `DataLoaders` whose train loader yields this rank's `batches` (lists of (x, pid, camid) items), in order"
    items = [it for b in batches for it in b]
    train = DataLoader(items, bs=len(batches[0]), shuffle=False, drop_last=True)
    valid = DataLoader(items[:len(batches[0])], bs=len(batches[0]))
    train.per_rank = valid.per_rank = True   # already this rank's data: not for fastai's DistributedDL
    dls = DataLoaders(train, valid)
    dls.n_inp = 1
    return dls


def make_items(x, pid, cam): return list(zip(x, pid, cam))


class GradRecorder(Callback):
    "The gradients as the optimizers use them: after DDP (backward) and `CenterLossOptimizer` (11) averaged them (and x 1/beta)"
    order = 11.5   # before_step: after CenterLossOptimizer averaged the centres' gradients and rescaled them by 1/beta
    def before_fit(self): self.model_grads, self.centre_grads = [], []
    def before_step(self):
        self.model_grads.append({n: p.grad.detach().clone() for n, p in self.learn.model.module.named_parameters()})
        self.centre_grads.append(self.learn.loss_func.terms['center'].centers.grad.detach().clone())


def check_centre_step(rank, world):
    "One step of two ranks: identical centres, equal to a single-process step on the concatenated batch; per-rank triplet mining"
    g = torch.Generator().manual_seed(0)
    p, k, n_in, dim, beta, centre_lr = 2, 4, 6, 5, 0.005, 0.5
    pid = torch.arange(p * world).repeat_interleave(k)               # the global batch: P*N identities x K
    x = torch.randn(len(pid), n_in, generator=g) + pid[:, None].float()
    cam = torch.arange(len(pid)) % 3
    rows = [torch.arange(r * p * k, (r + 1) * p * k) for r in range(world)]   # rank r: identities rP..(r+1)P-1
    torch.manual_seed(1 + rank)   # different on purpose: model and centres must come from rank 0
    model = Lin(n_in, dim)
    loss = ReIDLoss(triplet=TripletLoss(0.3), center=(CenterLoss(p * world, dim), beta))
    init_model = copy.deepcopy(gather(model.state_dict())[0])
    init_centres = gather(loss.terms['center'].centers.detach().clone())[0]
    mine = rows[rank]
    dls = per_rank_dls([make_items(x[mine], pid[mine], cam[mine])])
    rec = GradRecorder()
    learn = Learner(dls, model, loss_func=loss, opt_func=reid_opt_func(), lr=1e-2, wd=0.,
                    cbs=[CenterLossOptimizer(lr=centre_lr), NaNStop(), SkipValidation(), rec])
    with learn.no_bar():
        kinds = [(cb, type(cb)) for cb in learn.cbs]
        with distributed_context(learn):
            assert all(type(cb) is k for cb, k in kinds), 'no callback changes class: they are rank-aware themselves'
            learn.fit(1)
        assert [(cb, type(cb)) for cb in learn.cbs] == kinds, 'the context leaves the callbacks as they were'
    centres = learn.loss_func.terms['center'].centers.detach().clone()
    all_centres = gather(centres)
    assert all(torch.equal(c, all_centres[0]) for c in all_centres), 'every rank holds identical centres'
    # the single-process computation on the concatenated batch (same initial weights and centres)
    ref_model, ref_loss = Lin(n_in, dim), ReIDLoss(triplet=TripletLoss(0.3), center=(CenterLoss(p * world, dim), beta))
    ref_model.load_state_dict(init_model)
    with torch.no_grad(): ref_loss.terms['center'].centers.copy_(init_centres)
    feat = ref_model.train()(x)['feat']
    tri = ref_loss.terms['triplet']
    per_rank_tri = sum(tri(feat[r], pid[r], cam[r]) for r in rows) / world   # batch-hard mining inside each rank's batch
    total = per_rank_tri + beta * ref_loss.terms['center'](feat, pid, cam)
    total.backward()
    ref_c = ref_loss.terms['center'].centers
    expected = init_centres - centre_lr * ref_c.grad / beta              # the centres' SGD step, gradient x 1/beta
    err_c = float((centres - expected).abs().max())
    err_cg = float((rec.centre_grads[0] * beta - ref_c.grad).abs().max())
    err_g = max(float((rec.model_grads[0][n] - q.grad).abs().max()) for n, q in ref_model.named_parameters())
    assert err_c < 1e-5 and err_cg < 1e-5, f"centres differ from the single-process step: {err_c}, grads {err_cg}"
    assert err_g < 1e-5, f"model gradients differ from the per-rank-mining reference: {err_g}"
    # mining over the global batch would give other gradients: the check above does tell per-rank mining apart
    ref_model.zero_grad()
    glob = tri(ref_model(x)['feat'], pid, cam) + beta * ref_loss.terms['center'](ref_model(x)['feat'], pid, cam)
    gg = torch.autograd.grad(glob, list(ref_model.parameters()))
    diff_global = max(float((rec.model_grads[0][n] - q).abs().max()) for (n, _), q in zip(ref_model.named_parameters(), gg))
    RESULTS['centre_step'] = dict(max_err_centres=err_c, max_err_centre_grads=err_cg, max_err_model_grads=err_g,
                                  moved=float((centres - init_centres).abs().max()), diff_vs_global_mining=diff_global,
                                  centre_steps=learn.center_loss_optimizer.n_steps)
    assert RESULTS['centre_step']['moved'] > 1e-3 and learn.center_loss_optimizer.n_steps == 1


def check_loss_params(rank, world):
    "The verification classifier, a loss parameter DDP does not wrap: rank 0's weights on every rank, then the same steps"
    g = torch.Generator().manual_seed(3)
    p, k, n_in, dim = 2, 4, 6, 5
    pid = torch.arange(p * world).repeat_interleave(k)
    x = torch.randn(len(pid), n_in, generator=g) + pid[:, None].float()
    cam = torch.arange(len(pid)) % 3
    mine = torch.arange(rank * p * k, (rank + 1) * p * k)
    torch.manual_seed(10 + rank)   # a different head on each rank, on purpose
    loss = ReIDLoss(triplet=TripletLoss(0.3), verif=VerificationLoss(dim))
    head0 = gather(loss.terms['verif'].classifier.weight.detach().clone())[0]
    model = Lin(n_in, dim)
    dls = per_rank_dls([make_items(x[mine], pid[mine], cam[mine])] * 3)   # three steps
    learn = Learner(dls, model, loss_func=loss, opt_func=reid_opt_func(), lr=1e-2, wd=0., cbs=[NaNStop(), SkipValidation()],
                    splitter=lambda m: [list(m.parameters()) + loss.trainable_params()])   # as reid_splitter(model, loss) does
    with learn.no_bar(), distributed_context(learn): learn.fit(1)
    heads = gather(learn.loss_func.terms['verif'].classifier.weight.detach().clone())
    assert all(torch.equal(h, heads[0]) for h in heads), 'every rank holds the same verification head'
    moved = float((heads[0] - head0).abs().max())
    assert moved > 1e-4, f'the head did not train ({moved})'
    RESULTS['loss_params'] = dict(head_moved=moved)


def check_counters(rank, world):
    "LR schedule and camera-bias iterations: the same global iteration on every rank, every batch"
    g = torch.Generator().manual_seed(2)
    n_b, bs = 3, 8
    x, pid, cam = torch.randn(n_b * bs, 6, generator=g), torch.arange(n_b * bs) // 4 % 4, torch.arange(n_b * bs) % 3
    dls = per_rank_dls([make_items(x[i*bs:(i+1)*bs] + rank, pid[i*bs:(i+1)*bs], cam[i*bs:(i+1)*bs]) for i in range(n_b)])
    loss = ReIDLoss(triplet=TripletLoss(0.3, camera_bias=CameraBias(k=5., m=0.1)))
    seen = []
    class Seen(Callback):
        order = 100
        def after_batch(self):
            if self.training: seen.append((self.train_iter, float(self.opt.hypers[-1]['lr']), camera_biases(self.loss_func)[0].iteration))
    learn = Learner(dls, Lin(), loss_func=loss, opt_func=reid_opt_func(), lr=1e-2, cbs=[CameraBiasSchedule(), SkipValidation(), Seen()])
    with learn.no_bar(), distributed_context(learn):
        fit_warmup_multistep(learn, 2, lr=1e-2, warmup_epochs=1, milestones=(1,), per_iter=True)
    all_seen = gather(seen)
    assert all(s == all_seen[0] for s in all_seen), f"ranks count differently: {all_seen}"
    assert [s[0] for s in seen] == [s[2] for s in seen] == list(range(1, 2 * n_b + 1))
    assert len({s[1] for s in seen}) > 2   # the learning rate did change along the way
    RESULTS['counters'] = all_seen[0]


class MyNaNStop(NaNStop):
    "A user's subclass: collective as `NaNStop` is (nothing swaps classes by exact type)"
    def after_train(self): super().after_train(); self.learn.my_nan_stop_ran = True


def check_nan_stop(rank, world, impl, cls=NaNStop):
    "A NaN loss on rank 1 at batch 1: the step is skipped on every rank, every rank stops, all know where and which rank"
    g = torch.Generator().manual_seed(3)
    n_b, bs = 3, 8
    x, pid, cam = torch.randn(n_b * bs, 6, generator=g), torch.arange(n_b * bs) // 4 % 4, torch.arange(n_b * bs) % 3
    x = x + rank
    if rank == 1: x[bs:2*bs] = float('nan')   # batch 1 of rank 1 only
    dls = per_rank_dls([make_items(x[i*bs:(i+1)*bs], pid[i*bs:(i+1)*bs], cam[i*bs:(i+1)*bs]) for i in range(n_b)])
    torch.manual_seed(0)
    loss = ReIDLoss(triplet=TripletLoss(0.3), center=(CenterLoss(4, 5), 0.005))
    snaps = []
    class Snap(Callback):
        order = 100
        def after_step(self): snaps.append(torch.cat([q.detach().reshape(-1).clone() for q in self.learn.model.parameters()]))
    learn = Learner(dls, Lin(), loss_func=loss, opt_func=reid_opt_func(impl=impl), lr=1e-2,
                    cbs=[cls(check_every=25), CenterLossOptimizer(), SkipValidation(), Snap()])
    t0 = time.monotonic()
    with learn.no_bar(), warnings.catch_warnings(record=True) as w, distributed_context(learn):
        warnings.simplefilter('always')
        learn.fit(1)
    seconds = max(gather(time.monotonic() - t0))   # a rank left waiting at a collective would fail at the 1-minute timeout
    stop = learn.nan_stop
    assert stop is not None and (stop['epoch'], stop['iter'], stop['rank']) == (0, 1, 1), stop
    assert not math.isfinite(stop['last']['loss']), stop   # rank 1's values, also on rank 0
    final = torch.cat([q.detach().reshape(-1) for q in learn.model.parameters()])
    centres = learn.loss_func.terms['center'].centers.detach()
    assert torch.isfinite(final).all() and torch.isfinite(centres).all(), 'the non-finite step reached the weights'
    all_final, all_c, all_stop = gather(final), gather(centres.clone()), gather(stop)
    assert all(torch.equal(f, all_final[0]) for f in all_final) and all(torch.equal(c, all_c[0]) for c in all_c)
    assert all(json.dumps(s, sort_keys=True) == json.dumps(all_stop[0], sort_keys=True) for s in all_stop)   # NaN != NaN
    if impl == 'torch':   # fused Adam: steps 0 and 2 applied, step 1 skipped on the device (decided at the periodic check)
        assert len(snaps) == 3 and torch.equal(snaps[0], snaps[1]) and not torch.equal(snaps[1], snaps[2])
    else:                 # fastai's Adam: NaNStop decides every batch, on the host: stopped before step 1
        assert len(snaps) == 1 and torch.equal(final, snaps[0])
    RESULTS[f'nan_stop_{impl}' + ('' if cls is NaNStop else '_subclass')] = dict(
        stop=stop, steps=len(snaps), seconds=seconds, warned=[str(m.message)[:300] for m in w if 'NaNStop' in str(m.message)])


def check_time_budget(rank, world):
    "TimeBudget with different clocks per rank: every rank stops after the same epoch (rank 0's clock decides)"
    fake = {'t': 0.}
    def clock():   # rank 0: each epoch takes 40 s; rank 1: no time passes (it alone would never stop)
        if rank == 0: fake['t'] += 20.
        return fake['t']
    g = torch.Generator().manual_seed(4)
    x, pid, cam = torch.randn(8, 6, generator=g) + rank, torch.arange(8) // 4, torch.arange(8) % 3
    dls = per_rank_dls([make_items(x, pid, cam)])
    learn = Learner(dls, Lin(), loss_func=ReIDLoss(triplet=TripletLoss(0.3)), opt_func=reid_opt_func(), lr=1e-2,
                    cbs=[TimeBudget(max_minutes=1.5, clock=clock), SkipValidation()])
    with learn.no_bar(), distributed_context(learn):
        learn.fit(5)
    stops = gather(learn.time_stop)
    assert stops[0] is not None and all(s == stops[0] for s in stops), stops
    RESULTS['time_budget'] = stops[0]


def check_evaluation(rank, world, data):
    "distributed_evaluate, both modes and both pipelines: exactly the metrics of a single-process evaluation by rank 0"
    df = reid_df(data)
    out = {}
    for pipeline in ('pil', 'cached'):
        dls = reid_dataloaders(df, p=4, k=4, size=(32, 16), num_workers=0, seed=0, device='cpu', pipeline=pipeline,
                               cache_dir=False, test_bs=12)   # 80 test images: 7 batches, uneven across the ranks
        torch.manual_seed(0)
        net = ReIDNet('test_resnet', n_classes=dls.n_classes, pretrained='none')
        ref = evaluate_reid(net, dls)   # every rank alone, before any collective: rank 0's is the reference
        if rank == 1:   # rank 1's BatchNorm statistics differ (as after a DDP batch): rank 0's must be used
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d): m.running_mean.add_(0.5)
        ref0 = gather(ref)[0]
        for mode in ('gather', 'rank0'):
            for kw in (dict(), dict(metric='cosine', flip=False)):
                res = distributed_evaluate(net, dls, mode=mode, **kw)
                want = ref0 if not kw else gather(evaluate_reid(net, dls, **kw) if rank == 0 else None)[0]
                assert res == want, f"{pipeline}/{mode}/{kw}: {res} != {want}"
        out[pipeline] = ref0
    # an error on rank 0 (non-finite features) is raised on every rank, not a hang
    class NaNNet(nn.Module):
        def forward(self, x): return torch.full((len(x), 4), float('nan'))
    try: distributed_evaluate(NaNNet(), dls, mode='gather'); raise AssertionError('no error')
    except ValueError as e: assert 'non-finite' in str(e)
    RESULTS['evaluation'] = out


def check_sync_bn_refused(rank, world):
    "SyncBatchNorm trains on GPU tensors only: on the CPU the context says so"
    dls = per_rank_dls([make_items(torch.randn(8, 6), torch.arange(8) // 4, torch.arange(8) % 3)])
    learn = Learner(dls, Lin(), loss_func=ReIDLoss(triplet=TripletLoss(0.3)))
    try:
        with distributed_context(learn, sync_bn=True): pass
        raise AssertionError('sync_bn accepted on the CPU')
    except ValueError as e: assert 'needs CUDA' in str(e)


def check_interrupt(rank, world, out):
    "SIGTERM to rank 1 alone inside epoch 0: every rank stops after the same batch, rank 0 saves; resumed, the run ends as an uninterrupted one"
    g = torch.Generator().manual_seed(5)
    n_b, bs = 4, 8
    x, pid, cam = torch.randn(n_b * bs, 6, generator=g) + rank, torch.arange(n_b * bs) // 4 % 4, torch.arange(n_b * bs) % 3
    batches = [make_items(x[i*bs:(i+1)*bs], pid[i*bs:(i+1)*bs], cam[i*bs:(i+1)*bs]) for i in range(n_b)]
    class Sigterm(Callback):
        order = 60
        def after_batch(self):
            if rank == 1 and self.training and (self.epoch, self.iter) == (0, 1): os.kill(os.getpid(), signal.SIGTERM)   # a real signal
    def run(path, cbs=(), resume=False):
        torch.manual_seed(0)
        learn = Learner(per_rank_dls(batches), Lin(), loss_func=ReIDLoss(triplet=TripletLoss(0.3), center=(CenterLoss(4, 5), 0.005)),
                        opt_func=reid_opt_func(), lr=1e-2, path=path,
                        cbs=[NaNStop(), CenterLossOptimizer(), SkipValidation(), ReIDCheckpoint(every=10, check_every=1)] + list(cbs))
        if resume: resume_from(learn, path/'checkpoints')
        with learn.no_bar(), learn.no_logging(), distributed_context(learn):
            fit_warmup_multistep(learn, 2, lr=1e-2, warmup_epochs=1, milestones=(1,))
        return learn
    params = lambda l: torch.cat([q.detach().reshape(-1) for q in l.model.parameters()])
    whole = run(out/'whole')
    cut = run(out/'cut', [Sigterm()])
    stops = gather(cut.interrupted)
    assert stops[0] is not None and all(s == stops[0] for s in stops), stops
    assert (stops[0]['signal'], stops[0]['epoch'], stops[0]['iter']) == ('SIGTERM', 0, 2), stops[0]   # rank 1's signal, both stopped
    files = sorted(f.name for f in (out/'cut'/'checkpoints').iterdir()) if not rank else None
    resumed = run(out/'cut', resume=True)
    assert torch.equal(params(resumed), params(whole)), 'the resumed run ends where the uninterrupted one did'
    assert all(torch.equal(p, params(whole)) for p in gather(params(resumed)))
    RESULTS['interrupt'] = dict(stop=stops[0], files=files)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--data', required=True)
    ap.add_argument('--out', required=True)
    a = ap.parse_args()
    setup_distributed('cpu', timeout_minutes=1)   # a rank left waiting fails within a minute instead of hanging
    rank, world = rank_distrib(), num_distrib()
    assert world == 2, 'run with torchrun --nproc_per_node 2'
    check_centre_step(rank, world)
    check_loss_params(rank, world)
    check_counters(rank, world)
    check_nan_stop(rank, world, 'torch')
    check_nan_stop(rank, world, 'fastai')
    check_nan_stop(rank, world, 'torch', MyNaNStop)
    check_interrupt(rank, world, Path(a.out))
    check_time_budget(rank, world)
    check_evaluation(rank, world, a.data)
    check_sync_bn_refused(rank, world)
    if not rank:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, 'checks.json').write_text(json.dumps(RESULTS, indent=1, default=str))
        print('ddp_checks: all passed', flush=True)
    dist.destroy_process_group()


if __name__ == '__main__': main()
