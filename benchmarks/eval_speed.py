#!/usr/bin/env python
"""Speed of `reid_fastai.evaluation` at Market-1501 size.

Random 2,048-d features with a Market-like structure: 3,368 queries of 750 identities (4-5 per identity, each
from its own camera), 15,913 gallery images (13,120 of the same 750 identities + 2,793 distractors with
pid 0), 6 cameras. Each feature = identity centre + camera offset + noise, so the metrics are neither 0 nor 1.

Times (seconds: the median over --repeat runs and the spread min-max, with the 1-minute load average they ran under;
on a shared machine the same evaluation took 1.5-4.0 s back to back, so one number means little):
  - distance matrix (euclidean), evaluate_rank (CMC/mAP/mINP), and both together;
  Wall-clock times depend on what else runs on the machine; the CPU time (summed over threads) does much less,
  and CPU time / threads estimates the wall-clock time on an idle machine.
  - k-reciprocal re-ranking (+ evaluate_rank) at --rerank-frac of the full size, with the peak RSS of the process
    during re-ranking (CPU), or the peak CUDA memory (GPU).

  python benchmarks/eval_speed.py                       # CPU, all cores, re-ranking at full size
  python benchmarks/eval_speed.py --rerank-frac 0.25    # re-ranking on a quarter of the queries and gallery
  python benchmarks/eval_speed.py --device cuda         # GPU
  python benchmarks/eval_speed.py --out benchmarks/results/eval_speed_cpu.txt
"""
import argparse, datetime, os, platform, statistics, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout without installing
from reid_fastai.evaluation import compute_distmat, evaluate_rank, re_ranking


def market_like(n_q=3368, n_g=15913, n_ids=750, n_distractors=2793, n_cams=6, dim=2048, noise=2.7, cam_shift=0.5, seed=0):
    "Random features, pids and camids shaped like Market-1501's test set"
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(1, n_ids + 1)
    n_id_imgs = n_g - n_distractors
    g_pids = torch.cat([ids.repeat(n_id_imgs // n_ids), ids[torch.randperm(n_ids, generator=g)[:n_id_imgs % n_ids]],
                        torch.zeros(n_distractors, dtype=torch.long)])
    g_cams = torch.randint(0, n_cams, (n_g,), generator=g)
    per_id = torch.full((n_ids,), n_q // n_ids)
    per_id[torch.randperm(n_ids, generator=g)[:n_q % n_ids]] += 1
    q_pids = torch.repeat_interleave(ids, per_id)
    q_cams = torch.cat([torch.randperm(n_cams, generator=g)[:int(k)] for k in per_id])   # one query per camera
    centres = torch.randn(n_ids + 1, dim, generator=g)
    cam_vecs = torch.randn(n_cams, dim, generator=g) * cam_shift
    def feats(pids, cams):
        f = centres[pids] + cam_vecs[cams] + noise * torch.randn(len(pids), dim, generator=g)
        d = pids == 0
        f[d] += torch.randn(int(d.sum()), dim, generator=g) - centres[0]   # distractors: each a different nobody
        return f
    return feats(q_pids, q_cams), feats(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def timed(fn, device, repeat):
    "Result of the last run, and the lists of wall-clock times, process CPU times (all threads) and 1-minute loads"
    times, cpu, load = [], [], []
    for _ in range(repeat):
        load.append(os.getloadavg()[0])
        sync(device); t, c = time.perf_counter(), time.process_time()
        out = fn()
        sync(device); times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
    return out, (times, cpu, load)


def fmt(tc):
    "The median wall-clock time and its spread (min-max) over the runs, the median CPU time, and the load they ran under"
    times, cpu, load = tc
    return (f"wall median {statistics.median(times):7.3f} s  (min {min(times):.3f}, max {max(times):.3f})   "
            f"cpu median {statistics.median(cpu):7.3f} s   load {min(load):.2f}-{max(load):.2f}   (n={len(times)})")


def _status_kb(key):
    try:
        for line in open('/proc/self/status'):
            if line.startswith(key): return int(line.split()[1])
    except OSError: pass
    return None


def reset_peak_rss():
    "Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed"
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return True
    except OSError: return False


def cpu_model():
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or 'unknown'


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'auto'")
    ap.add_argument('--threads', type=int, default=os.cpu_count(), help='torch.set_num_threads (CPU)')
    ap.add_argument('--repeat', type=int, default=5)
    ap.add_argument('--rerank-frac', type=float, default=1.0, help='fraction of queries and gallery for re-ranking (0 skips it)')
    ap.add_argument('--rerank-repeat', type=int, default=1)
    ap.add_argument('--scale', type=float, default=1.0, help='fraction of the Market-1501 sizes (a quick check: 0.05)')
    ap.add_argument('--out', default=None, help='also write the report to this file')
    ap.add_argument('--commit', default=None, help='git commit to record (a copy of the tree without .git)')
    args = ap.parse_args()

    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    torch.set_num_threads(args.threads)
    lines = []
    def log(s=''):
        print(s, flush=True); lines.append(s)
        if args.out:   # each line as it comes: a run stopped at a time limit keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, 'w') as f: f.write('\n'.join(lines) + '\n')

    log(f"# reid_fastai evaluation speed, {datetime.datetime.now().isoformat(timespec='seconds')}")
    log(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}" + (f"; commit {args.commit}" if args.commit else ''))
    log(f"machine: nproc {os.cpu_count()}, CPU {cpu_model()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == 'cuda' else ''))

    s = args.scale
    qf, gf, q_pids, g_pids, q_cams, g_cams = market_like(*(round(n * s) for n in (3368, 15913)), n_ids=max(10, round(750 * s)),
                                                          n_distractors=round(2793 * s))
    log(f"data: {len(qf)} queries x {len(gf)} gallery, dim {qf.shape[1]}, {int((g_pids == 0).sum())} distractors")
    qf, gf, q_pids, g_pids, q_cams, g_cams = (t.to(device) for t in (qf, gf, q_pids, g_pids, q_cams, g_cams))

    if device.type == 'cuda':  # warm-up: kernels, cuBLAS handles, caching allocator
        evaluate_rank(compute_distmat(qf[:64], gf), q_pids[:64], g_pids, q_cams[:64], g_cams)
    log()
    distmat, t_dist = timed(lambda: compute_distmat(qf, gf, 'euclidean'), device, args.repeat)
    log(f"distance matrix (euclidean)        {fmt(t_dist)}")
    res, t_eval = timed(lambda: evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams), device, args.repeat)
    log(f"evaluate_rank (CMC, mAP, mINP)     {fmt(t_eval)}")
    del distmat
    res, t_both = timed(lambda: evaluate_rank(compute_distmat(qf, gf, 'euclidean'), q_pids, g_pids, q_cams, g_cams),
                        device, args.repeat)
    log(f"distances + evaluate_rank          {fmt(t_both)}")
    log(f"  -> R1 {res['R1']:.4f}  R5 {res['R5']:.4f}  R10 {res['R10']:.4f}  mAP {res['mAP']:.4f}  "
        f"mINP {res['mINP']:.4f}  skipped {res['n_skipped']}")

    if args.rerank_frac > 0:
        n_q, n_g = round(len(qf) * args.rerank_frac), round(len(gf) * args.rerank_frac)
        sub = lambda t, n: t[:n]   # the first n queries / gallery images (gallery identities are spread evenly)
        rq, rg = sub(qf, n_q), sub(gf, n_g)
        log()
        log(f"re-ranking (k1=20, k2=6, lambda=0.3) on {n_q} x {n_g} (fraction {args.rerank_frac:g}, N = {n_q + n_g})")
        if device.type == 'cuda':
            re_ranking(rq[:50], rg[:200]); torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device)
        rss0 = _status_kb('VmRSS'); hwm_reset = reset_peak_rss()
        dist_rr, t_rr = timed(lambda: re_ranking(rq, rg), device, args.rerank_repeat)
        log(f"re_ranking                         {fmt(t_rr)}")
        if device.type == 'cuda':
            log(f"  peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
                f"(inputs etc. {base_mem / 2**30:.2f} GiB before)")
        else:
            hwm = _status_kb('VmHWM')
            log(f"  peak RSS {hwm / 2**20:.2f} GiB (RSS before {rss0 / 2**20:.2f} GiB, so about "
                f"{(hwm - rss0) / 2**20:.2f} GiB for re-ranking)" + ('' if hwm_reset else ' [peak counter could not be reset: process peak]'))
        r = evaluate_rank(dist_rr, sub(q_pids, n_q), sub(g_pids, n_g), sub(q_cams, n_q), sub(g_cams, n_g))
        b = evaluate_rank(compute_distmat(rq, rg), sub(q_pids, n_q), sub(g_pids, n_g), sub(q_cams, n_q), sub(g_cams, n_g))
        log(f"  -> euclidean R1 {b['R1']:.4f} mAP {b['mAP']:.4f}   re-ranked R1 {r['R1']:.4f} mAP {r['mAP']:.4f}")
    log(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:   # rewritten as it goes: see `log`
        pass


if __name__ == '__main__': main()
