"""WorkerBatches: the ResumableBatches stream built in DataLoader workers (--dataloader_num_workers)."""

import pytest
import torch

from noise_rater.data import ResumableBatches, prepare_datasets
from noise_rater.data_workers import WorkerBatches


def digits(random_flip):
    splits = prepare_datasets("digits", resolution=8, num_channels=1, random_flip=random_flip, seed=0,
                              use_labels=True)
    return torch.utils.data.Subset(splits.train, range(40))  # 2.5 batches of 16 per epoch: batches straddle epochs


def take(stream, n):
    return [next(stream) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_without_flips_equals_the_in_process_stream():
    data = digits(random_flip=False)
    ref = take(ResumableBatches(data, 16, seed=3), 5)
    got = take(WorkerBatches(ResumableBatches(data, 16, seed=3), num_workers=2), 5)
    assert same(ref, got)
    assert not torch.equal(ref[0]["pixel_values"], ref[2]["pixel_values"])  # a new epoch, a new order


def test_flips_are_per_item_reproducible_and_independent_of_workers_and_resume():
    plain, flipped = digits(False), digits(True)
    rng_before = torch.get_rng_state()
    one = take(WorkerBatches(ResumableBatches(flipped, 16, seed=3), num_workers=1), 5)
    two = take(WorkerBatches(ResumableBatches(flipped, 16, seed=3), num_workers=2), 5)
    assert same(one, two)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training process's global RNG is untouched
    # every item is the plain item or its mirror image, and both occur
    ref = take(ResumableBatches(plain, 16, seed=3), 5)
    n_flipped = 0
    for r, b in zip(ref, one):
        x, y = r["pixel_values"], b["pixel_values"]
        is_same = (x == y).flatten(1).all(1)
        is_flip = (x.flip(-1) == y).flatten(1).all(1)
        assert (is_same | is_flip).all() and torch.equal(r["class_labels"], b["class_labels"])
        n_flipped += int((is_flip & ~is_same).sum())
    assert 0 < n_flipped < 5 * 16
    # resume after 3 batches (the third straddles epochs 0 and 1): the same next batches
    stream = WorkerBatches(ResumableBatches(flipped, 16, seed=3), num_workers=2)
    take(stream, 3)
    state = stream.state_dict()
    assert (state["epoch"], state["position"]) == (1, 8)
    resumed = WorkerBatches(ResumableBatches(flipped, 16, seed=3), num_workers=2)
    resumed.load_state_dict(state)
    assert same(take(resumed, 2), one[3:])
    assert resumed.epoch == 2 and resumed.batches_per_epoch == 2.5


def test_bad_num_workers():
    with pytest.raises(ValueError, match="num_workers"):
        WorkerBatches(ResumableBatches(digits(False), 16, seed=0), num_workers=0)
