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

REPO = Path(__file__).resolve().parents[1]

def _attribute_file():
    for d in [Path(os.environ['REID_DATASETS']) if os.environ.get('REID_DATASETS') else None, *[p/'shared'/'datasets' for p in REPO.parents]]:
        if d is not None and (d/'market_attribute.mat').is_file(): return d/'market_attribute.mat'

@pytest.fixture(scope='module')
def market():
    mat, root = _attribute_file(), market1501_path()
    if mat is None or root is None: pytest.skip('Market-1501 or market_attribute.mat not found (../shared/datasets)')
    return reid_df(root), market_attributes(mat)

def test_attr_recipe_on_market(market, tmp_path):
    df, attrs = market
    equals(attrs.shape[1], 27)                                    # APR's 27 identity-level attributes (age in 4 classes)
    train_ids = sorted(df[df.split == 'train'].pid.unique())[:12]
    test_ids = sorted(set(df[df.split == 'query'].pid))[:12]
    sub = df[df.pid.isin(train_ids) | df.pid.isin(test_ids)].reset_index(drop=True)   # the gallery's distractors (0) go too
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
