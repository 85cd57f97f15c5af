"""Driver of tests/test_ddp.py: train a recipe on a re-ID dataset as `reid_train` does, with `reid_fastai.distributed`, alone
or under `torchrun --nproc_per_node N`. Rank 0 writes OUT/results.json; every rank writes OUT/rank{r}.json (what it trained
on: the labels of every batch, learning rates, counters, a checksum of the weights and the centres).

    torchrun --standalone --nproc_per_node 2 tests/ddp_train.py --data DEMO --out OUT --epochs 1
"""
import argparse, json, os, sys, time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--epochs', type=int, default=1)
    ap.add_argument('--recipe', default='paper')
    ap.add_argument('--arch', default='test_resnet')
    ap.add_argument('--pipeline', default='pil', choices=['pil', 'cached'])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--seed', type=int, default=3)
    ap.add_argument('--eval-mode', default='gather', choices=['gather', 'rank0'])
    ap.add_argument('--sync-bn', action='store_true')
    ap.add_argument('--resume', action='store_true', help='continue from the newest checkpoint in OUT/checkpoints')
    ap.add_argument('--crash-after', type=int, default=0, help='rank 1 dies after the checkpoint of this epoch (1-based)')
    a = ap.parse_args(argv)

    import numpy as np, torch
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 1)))
    from fastai.callback.core import Callback
    from fastai.torch_core import set_seed
    from reid_fastai import data as reid_data
    from reid_fastai.loaders import reid_dataloaders
    from reid_fastai.learner import reid_learner
    from reid_fastai.recipes import get_recipe
    from reid_fastai.train import TrainTimer
    from fastai.distributed import rank0_first
    from fastai.torch_core import rank_distrib, num_distrib
    from reid_fastai.callbacks import camera_biases, center_loss_terms
    from reid_fastai.checkpoint import ReIDCheckpoint, resume_from, latest_checkpoint
    from reid_fastai.evaluation import evaluate_reid
    from reid_fastai.distributed import setup_distributed, distributed_context

    dev = setup_distributed(a.device)   # first: joins the process group (gloo on the CPU), picks this rank's GPU
    rank, world = rank_distrib(), max(1, num_distrib())
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    set_seed(a.seed, reproducible=True)
    r = get_recipe(a.recipe)
    df = reid_data.reid_df(a.data)
    # rank 0 builds the decoded-image cache, the others then read it
    dls = rank0_first(reid_dataloaders, df, p=4, k=4, size=(32, 16), num_workers=0, seed=a.seed, device=dev, pipeline=a.pipeline,
                      cache_dir=out/'cache', test_bs=24, **r.data)

    class Record(Callback):
        "What this rank trained on"
        order = 100
        def before_fit(self): self.batches, self.loaders, self.n_batches = [], [], []
        def before_train(self): self.loaders.append(type(self.learn.dl).__name__); self.n_batches.append(len(self.learn.dl))
        def after_batch(self):
            if not self.training: return
            cb = camera_biases(self.learn.loss_func)
            self.batches.append(dict(epoch=self.epoch, iter=self.iter, train_iter=self.train_iter,
                                     labels=self.learn.yb[0].tolist(), lr=float(self.learn.opt.hypers[-1]['lr']),
                                     camera_iteration=cb[0].iteration if cb else None))

    class Crash(Callback):
        "Rank 1 dies (as a killed process would) once the checkpoint of epoch `crash_after` is written"
        order = 70   # after ReIDCheckpoint (65)
        def after_epoch(self):
            if rank == 1 and self.epoch + 1 == a.crash_after:
                print(f"ddp_train: rank 1 crashes after epoch {self.epoch + 1}", flush=True)
                os._exit(3)

    rec, crash = Record(), Crash()
    learn = reid_learner(dls, a.arch, r, pretrained='none', lr=1e-3, eval_every=1, path=out,
                         cbs=[ReIDCheckpoint(every=1, path='checkpoints'), TrainTimer(), rec, crash])
    start = 0
    if a.resume:
        start = resume_from(learn, out/'checkpoints')   # every rank loads the same file
        if not rank: print(f"ddp_train: resuming from {latest_checkpoint(out/'checkpoints').name}, epoch {start}")
    t0 = time.perf_counter()
    with learn.no_bar(), distributed_context(learn, sync_bn=a.sync_bn, eval_mode=a.eval_mode):
        n_train = len(learn.dls.train)
        learn.fit_recipe(a.epochs, lr=1e-3, start_epoch=start)
    seconds = time.perf_counter() - t0
    params = sum(float(p.detach().double().sum()) for p in learn.model.parameters())
    centres = [t.centers.detach().cpu().tolist() for _, t, _ in center_loss_terms(learn.loss_func)]
    (out/f'rank{rank}.json').write_text(json.dumps(dict(
        rank=rank, world_size=world, device=str(dev), n_train_batches=n_train, loaders=rec.loaders, n_batches=rec.n_batches,
        batches=rec.batches, train_iter=int(learn.train_iter), params=params, centres=centres,
        nan_stop=learn.nan_stop, loader_after=type(learn.dls.train).__name__, model_after=type(learn.model).__name__)))
    if not rank:   # what reid_train writes once
        hist = getattr(learn, 'reid_history', None) or []
        ref = {k: float(v) for k, v in evaluate_reid(learn.model, dls, flip=learn.test_flip).items()}   # one process, after the fit, with the learner's TTA
        res = dict(world_size=world, seconds=round(seconds, 1), history=hist, reference=ref,
                   epochs=(hist[-1]['epoch'] + 1) if hist else 0, images=learn.train_timer.images)
        (out/'results.json').write_text(json.dumps(res, indent=2, default=str))
        learn.remove_cbs([rec, crash])   # classes of this script: not for export.pkl
        learn.export('export.pkl')
        print(f"ddp_train: {world} process(es), {res['epochs']} epochs in {seconds:.1f}s -> {out}", flush=True)


if __name__ == '__main__': main()
