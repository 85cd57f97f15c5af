#!/usr/bin/env python
"""Speed of `GalleryIndex.search`: the torch backend (distances block by block + a running top-k) against faiss's
exact flat index (`IndexFlatL2`, `pip install faiss-cpu`).

Random L2-normalised features (--dim 2048) for a gallery of --n images (default 1,000,000 on a GPU, 100,000 on the
CPU), --queries random queries (100), top --k (10). Each backend searches --repeat times; the table gives the median
and the spread (min-max) of the wall-clock time, with the 1-minute load average the runs saw. Also timed once: the
move of the gallery to the GPU (`GalleryIndex.to`) and faiss's index build (a copy of the features), which a
long-lived index pays once. The last line checks that the backends found the same neighbours.

  python benchmarks/search_speed.py                          # GPU if there is one (1M x 2048), else CPU (100k x 2048)
  python benchmarks/search_speed.py --device cpu --n 100000 --out benchmarks/results/search_speed_cpu.txt
  python benchmarks/search_speed.py --device cuda --n 1000000
"""
import argparse, datetime, json, os, platform, statistics, sys, time

import numpy as np, torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout without installing
from reid_fastai.gallery import GalleryIndex, have_faiss
from reid_fastai.images import available_cpus


def random_features(n, dim, seed=0, device='cpu', block=65536):
    "L2-normalised random float32 features [n, dim] as a numpy array, made block by block"
    g = torch.Generator(device=device).manual_seed(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, block):
        x = torch.randn(min(block, n - s), dim, generator=g, device=device)
        out[s:s + len(x)] = torch.nn.functional.normalize(x, dim=1).cpu().numpy()
    return out


def timed(fn, repeat, device):
    "Result of the last call; wall-clock times and 1-minute loads of each"
    times, loads, res = [], [], None
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        if device.type == 'cuda': torch.cuda.synchronize()
        t = time.perf_counter(); res = fn()
        if device.type == 'cuda': torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return res, times, loads


def device_label(device):
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=None, help='gallery size (default: 1,000,000 on a GPU, 100,000 on the CPU)')
    p.add_argument('--dim', type=int, default=2048)
    p.add_argument('--queries', type=int, default=100)
    p.add_argument('--k', type=int, default=10)
    p.add_argument('--repeat', type=int, default=5)
    p.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda if available); faiss runs on the CPU")
    p.add_argument('--backends', default='torch,faiss', help='comma-separated: torch, faiss')
    p.add_argument('--threads', type=int, default=None, help='CPU threads for torch and faiss (default: the free cores)')
    p.add_argument('--chunk-size', type=int, default=None, help='torch: gallery rows per block (default: GalleryIndex.search\'s)')
    p.add_argument('--out', default=None, help='also write the report to this file')
    p.add_argument('--commit', default=None, help='git commit to record (a copy of the tree without .git)')
    a = p.parse_args(argv)
    dev = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    n = a.n or (1_000_000 if dev.type == 'cuda' else 100_000)
    torch.set_num_threads(a.threads or available_cpus())
    load_before = os.getloadavg()
    t = time.perf_counter()
    gallery = random_features(n, a.dim, 0, dev if dev.type == 'cuda' else 'cpu')
    queries = torch.from_numpy(random_features(a.queries, a.dim, 1))
    idx = GalleryIndex.from_features(gallery, normalized=True)
    del gallery
    make_s = time.perf_counter() - t
    rows, once, found = [], {}, {}
    for backend in [b.strip() for b in a.backends.split(',') if b.strip()]:
        if backend == 'faiss' and not have_faiss(): print('faiss is not installed (pip install faiss-cpu): skipped'); continue
        if backend == 'torch':
            if dev.type == 'cuda':
                t = time.perf_counter(); idx.to(dev); torch.cuda.synchronize(); once['to_gpu_s'] = round(time.perf_counter() - t, 3)
            fn = lambda: idx.search(queries, k=a.k, backend='torch', device=dev, chunk_size=a.chunk_size)
            where = dev.type
        else:
            t = time.perf_counter(); idx._faiss_index('euclidean'); once['faiss_build_s'] = round(time.perf_counter() - t, 3)
            fn = lambda: idx.search(queries, k=a.k, backend='faiss')
            where = 'cpu'
        fn()   # warm-up (CUDA context, BLAS buffers)
        res, times, loads = timed(fn, a.repeat, torch.device(where))
        found[backend] = res['index'].to_numpy().reshape(a.queries, a.k)
        rows.append(dict(backend=backend, device=where, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                         load=f"{min(loads):.2f}-{max(loads):.2f}", n=n, dim=a.dim, queries=a.queries, k=a.k, runs=len(times),
                         threads=torch.get_num_threads()))
    agree = None
    if len(found) == 2:
        x, y = found.values()
        agree = float((x == y).mean())
    lines = [f"# GalleryIndex.search: {n:,} x {a.dim}-d gallery (L2-normalised random), {a.queries} queries, top {a.k}",
             f"# date {datetime.datetime.now().isoformat(timespec='seconds')}; device {device_label(dev)}; "
             f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
             f"command: python benchmarks/search_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}"
             + (f"; commit {a.commit}" if a.commit else ''),
             f"# making the features: {make_s:.1f} s" + ''.join(f"; {k} {v} s" for k, v in once.items()),
             f"{'backend':8s} {'device':6s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'queries/s':>10s}  load (1 min)"]
    for r in rows:
        lines.append(f"{r['backend']:8s} {r['device']:6s} {r['median_s']:9.4f} {r['min_s']:8.4f} {r['max_s']:8.4f} "
                     f"{a.queries / r['median_s']:10.1f}  {r['load']}  (n={r['runs']}, {r['threads']} threads)")
    if agree is not None: lines.append(f"# the same top-{a.k} neighbours in both backends: {agree:.2%} of the entries")
    summary = dict(n=n, dim=a.dim, queries=a.queries, k=a.k, device=device_label(dev), **once, agree=agree,
                   **{f"{r['backend']}_{r['device']}_median_s": round(r['median_s'], 4) for r in rows},
                   **{f"{r['backend']}_{r['device']}_spread_s": [round(r['min_s'], 4), round(r['max_s'], 4)] for r in rows})
    lines.append(json.dumps(summary))
    text = '\n'.join(lines)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, 'a') as f: f.write(text + '\n\n')
    return summary


if __name__ == '__main__':
    main()
