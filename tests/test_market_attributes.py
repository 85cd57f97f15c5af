"""The `attr` recipe (ID + attributes, APR) on the real Market-1501 and its attribute annotations (Lin et al.,
`market_attribute.mat`): a small subset of identities, one epoch, to check the whole path on real data: the 27
attribute heads, the attribute loss, and the attribute accuracy the evaluation reports. Skipped where the datasets
are absent (../shared/datasets, REID_MARKET1501, REID_DATASETS)."""
import math, os
from pathlib import Path
import pytest, torch
from fastcore.test import test_eq as equals

from reid_fastai.data import market1501_path, reid_df, market_attributes
from reid_fastai.loaders import reid_dataloaders
from reid_fastai.learner import reid_learner
from reid_fastai.cli import reid_train_cli

REPO = Path(__file__).resolve().parents[1]

def _attribute_file():
    for d in [Path(os.environ['REID_DATASETS']) if os.environ.get('REID_DATASETS') else None, *[p/'shared'/'datasets' for p in REPO.parents]]:
        if d is not None and (d/'market_attribute.mat').is_file(): return d/'market_attribute.mat'

@pytest.fixture(scope='module')
def market():
    mat, root = _attribute_file(), market1501_path()
    if mat is None or root is None: pytest.skip('Market-1501 or market_attribute.mat not found (../shared/datasets)')
    return reid_df(root), market_attributes(mat)

def _subset(df, n_ids=12):
    "12 training and 12 test identities of Market-1501 (the gallery's distractors, pid 0, go too)"
    train_ids = sorted(df[df.split == 'train'].pid.unique())[:n_ids]
    test_ids = sorted(set(df[df.split == 'query'].pid))[:n_ids]
    return df[df.pid.isin(train_ids) | df.pid.isin(test_ids)].reset_index(drop=True)

def test_attr_recipe_on_market(market, tmp_path):
    df, attrs = market
    equals(attrs.shape[1], 27)                                    # APR's 27 identity-level attributes (age in 4 classes)
    sub = _subset(df)
    torch.manual_seed(0)
    dls = reid_dataloaders(sub, p=4, k=4, size=(64, 32), num_workers=0, seed=0, device='cpu', pipeline='pil',
                           attributes=attrs)
    equals(dls.n_attrs, [4] + [2] * 26)
    learn = reid_learner(dls, 'resnet18', 'attr', pretrained='none', eval_every=1, path=tmp_path, threads=1)
    equals(len(learn.model.attr_heads), 27)
    with learn.no_bar(), learn.no_logging(): learn.fit_recipe(1, lr=1e-3)
    h = learn.reid_history[-1]
    assert 0 <= h['attr_acc'] <= 1 and math.isfinite(h['mAP']), h
    assert torch.isfinite(learn.loss_func.last_tensors['attr'])


def test_attr_recipe_from_the_command_line(market, tmp_path):
    "reid_train --recipe attr --attributes market_attribute.mat on a Market-1501 subset given as a CSV: attr_acc in results.json"
    df, _ = market
    csv = tmp_path/'market_subset.csv'
    _subset(df)[['path', 'pid', 'camid', 'split']].to_csv(csv, index=False)   # absolute paths
    res = reid_train_cli(['--data', str(csv), '--recipe', 'attr', '--attributes', str(_attribute_file()), '--arch', 'resnet18',
                          '--pretrained', 'none', '--epochs', '1', '--eval-every', '1', '--size', '64', '32', '--p', '4',
                          '--workers', '0', '--threads', '1', '--device', 'cpu', '--quiet', '--out', str(tmp_path/'run')])
    assert 0 <= res['attr_acc'] <= 1 and math.isfinite(res['mAP']), res
    equals(res['config']['attributes'], str(_attribute_file()))
