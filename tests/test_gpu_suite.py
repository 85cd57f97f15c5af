"""`benchmarks/gpu_suite.sh --dry-run`: the one command meant for the GPU machine, run here on the CPU with tiny sizes
and the demo data, so that the first (rare, expensive) GPU call does not fail on a typo."""
import json, os, subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, 'OUT': str(tmp_path/'out'), 'RUNS': str(tmp_path/'runs'), 'REID_FASTAI_CACHE': str(tmp_path/'cache')}
    r = subprocess.run(['bash', 'benchmarks/gpu_suite.sh', '--dry-run'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tp = json.loads((tmp_path/'out'/'throughput.json').read_text())
    for k in ('device', 'bare_img_s', 'fit_cached_img_s', 'fit_pil_img_s', 'data_cached_img_s', 'data_pil_img_s'):
        assert tp[k] is not None and (k == 'device' or tp[k] > 0), k
    res = json.loads((tmp_path/'out'/'dry_run_results.json').read_text())
    assert res['epochs'] == 2 and res['config']['pipeline'] == 'cached' and 0 <= res['R1'] <= 1
    assert (tmp_path/'runs'/'dry_run'/'checkpoints').is_dir() and (tmp_path/'out'/'dry_run_curves.png').stat().st_size > 1000
    # a second call continues the same run from its checkpoint
    r = subprocess.run(['bash', 'benchmarks/gpu_suite.sh', '--dry-run', '--resume', '--no-throughput'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'resuming from' in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
