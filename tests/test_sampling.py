"""Noise selectors against explicit per-candidate loops, brute force and Monte Carlo identities."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from noise_rater import (
    AssignmentNoiseSampler,
    KNNNoiseSampler,
    NoiseRaterModel,
    NoiseSelectingSampler,
    UniformNoiseSampler,
    build_noise_sampler,
)
from noise_rater.modeling_noise_rater import NoiseRaterOutput

C, H, W = 1, 8, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny per-sample forward passes: intra-op threading only adds overhead (and stalls on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_rater(dtype=torch.float64, num_class_embeds=None, scale=0.3, seed=1):
    """A small NoiseRaterModel with perturbed (non-default) weights so scores depend on the noise."""
    torch.manual_seed(seed)
    r = NoiseRaterModel(sample_size=8, in_channels=C, block_out_channels=(4, 8), downsample=(True, False),
                        time_embedding_dim=8, norm_num_groups=2, num_class_embeds=num_class_embeds)
    with torch.no_grad():
        for p in r.parameters():
            p.add_(scale * torch.randn_like(p))
    return r.to(dtype)


class NormRater(nn.Module):
    """Closed-form rater: s(x0, eps, t) = a * (|eps|^2 / d - 1) * sqrt(d / 2), the standardised chi-square."""

    def __init__(self, a=1.0, nan=False):
        super().__init__()
        self.a = a
        self.nan = nan
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x0, noise, timesteps, class_labels=None, return_dict=True):
        d = noise[0].numel()
        s = self.a * (noise.flatten(1).pow(2).mean(1) - 1) * math.sqrt(d / 2) + 0 * self.dummy
        if self.nan:
            s = s * float("nan")
        return NoiseRaterOutput(scores=s)


def make_x0(b, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, C, H, W, generator=g, dtype=dtype) * 2 - 1


def loop_scores(rater, x0, t, candidates, labels=None):
    """Scores by calling the rater once per (sample, candidate) pair: independent of the batched path."""
    b, n = candidates.shape[:2]
    t = torch.as_tensor(t).reshape(-1).expand(b)
    out = torch.empty(b, n, dtype=torch.float64)
    with torch.no_grad():
        for i in range(b):
            for j in range(n):
                kw = {} if labels is None else {"class_labels": labels[i:i + 1]}
                s = rater(x0[i:i + 1].to(rater.dtype), candidates[i, j:j + 1].to(rater.dtype), t[i:i + 1], **kw)
                out[i, j] = s.scores.double()[0]
    return out


def match_index(noise, candidates):
    """For each row, the index of the candidate the selected noise is (exactly) a copy of."""
    d = (candidates - noise.unsqueeze(1)).flatten(2).abs().amax(-1)  # (B, N)
    idx = d.argmin(1)
    assert (d.gather(1, idx[:, None]) == 0).all(), "selected noise is not one of the candidates"
    return idx


# --------------------------------------------------------------------------------------------------
# NoiseSelectingSampler: argmax
# --------------------------------------------------------------------------------------------------


def test_argmax_select_matches_explicit_loop_with_chunking():
    rater = tiny_rater()
    b, n = 3, 5
    x0 = make_x0(b)
    t = torch.tensor([3, 400, 999])
    cands = torch.randn(b, n, C, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = loop_scores(rater, x0, t, cands)
    assert (ref.max(1).values - ref.min(1).values > 1e-4).all()  # a real choice to make
    sampler = NoiseSelectingSampler(rater, num_candidates=n, selection="argmax", chunk_size=3)
    scores = sampler.score_candidates(x0, t, cands)
    assert scores.shape == (b, n) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    # chunking does not change the scores
    big = NoiseSelectingSampler(rater, num_candidates=n, chunk_size=4096).score_candidates(x0, t, cands)
    np.testing.assert_allclose(scores.numpy(), big.numpy(), rtol=1e-6, atol=1e-7)
    noise, w = sampler.select(x0, t, cands, return_weights=True)
    best = ref.argmax(1)
    assert torch.equal(noise, cands[torch.arange(b), best])
    assert torch.equal(w, torch.ones(b, dtype=torch.float64))
    # the argmax is not trivially candidate 0 everywhere
    assert len(set(best.tolist())) > 1 or best[0] != 0


def test_argmax_call_draws_with_generator_and_picks_top():
    rater = tiny_rater()
    b, n = 4, 6
    x0 = make_x0(b, seed=1)
    t = torch.tensor([10, 100, 500, 900])
    sampler = NoiseSelectingSampler(rater, num_candidates=n, chunk_size=3)
    noise = sampler(x0, t, generator=torch.Generator().manual_seed(7))
    cands = torch.randn(b, n, C, H, W, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    best = loop_scores(rater, x0, t, cands).argmax(1)
    assert torch.equal(noise, cands[torch.arange(b), best])


# --------------------------------------------------------------------------------------------------
# NoiseSelectingSampler: softmax and importance
# --------------------------------------------------------------------------------------------------


def _chi2(counts, probs):
    m = counts.sum()
    return float(((counts - m * probs) ** 2 / (m * probs)).sum())


def test_softmax_selection_frequencies_match_softmax_of_scores():
    rater = tiny_rater(dtype=torch.float32)
    n, m = 4, 4000
    x0 = make_x0(1, seed=3, dtype=torch.float32)
    t = torch.tensor([250])
    cands = torch.randn(1, n, C, H, W, generator=torch.Generator().manual_seed(11))
    s = loop_scores(rater, x0, t, cands)[0].numpy()
    tau = (s.max() - s.min()) / 2  # q ranges over a factor e^2
    q = np.exp(s / tau) / np.exp(s / tau).sum()
    sampler = NoiseSelectingSampler(rater, num_candidates=n, selection="softmax", temperature=tau)
    noise, w = sampler.select(x0.expand(m, -1, -1, -1), t.expand(m), cands.expand(m, -1, -1, -1, -1),
                              generator=torch.Generator().manual_seed(0), return_weights=True)
    assert torch.equal(w, torch.ones(m))
    idx = match_index(noise, cands.expand(m, -1, -1, -1, -1))
    counts = np.bincount(idx.numpy(), minlength=n).astype(np.float64)
    # chi-square with 3 degrees of freedom: P(chi2 > 21.1) = 1e-4
    assert _chi2(counts, q) < 21.1
    # power: the same counts reject tau = 1 (ignoring the temperature) and the uniform distribution
    q1 = np.exp(s) / np.exp(s).sum()
    assert _chi2(counts, q1) > 100
    assert _chi2(counts, np.full(n, 1 / n)) > 100


def test_importance_weights_are_inverse_n_q():
    rater = tiny_rater(dtype=torch.float32)
    b, n, tau = 6, 5, 0.05
    x0 = make_x0(b, seed=4, dtype=torch.float32)
    t = torch.tensor([0, 50, 200, 500, 800, 999])
    cands = torch.randn(b, n, C, H, W, generator=torch.Generator().manual_seed(2))
    s = loop_scores(rater, x0, t, cands).numpy()
    q = np.exp(s / tau) / np.exp(s / tau).sum(1, keepdims=True)
    sampler = NoiseSelectingSampler(rater, num_candidates=n, selection="importance", temperature=tau, chunk_size=7)
    noise, w = sampler.select(x0, t, cands, generator=torch.Generator().manual_seed(3), return_weights=True)
    idx = match_index(noise, cands).numpy()
    expected = 1.0 / (n * q[np.arange(b), idx])
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-4)
    assert np.abs(expected - 1).max() > 0.05  # the weights are not trivially one


def test_importance_sampling_is_unbiased_and_argmax_is_not():
    """E[w f(eps_sel)] = E_{eps ~ N(0, I)}[f(eps)] for importance; argmax visibly shifts it."""
    rater = NormRater(a=1.0)
    m, n = 4000, 8
    x0 = torch.zeros(m, C, H, W)
    t = torch.full((m,), 100)
    d = C * H * W

    def fs(eps):  # functions with known expectation under N(0, I)
        flat = eps.flatten(1).double()
        return {
            "|eps|^2/d": (flat.pow(2).mean(1), 1.0),
            "d*mean(eps)^2": (d * flat.mean(1).pow(2), 1.0),
            "1": (torch.ones(len(flat), dtype=torch.float64), 1.0),
        }

    results = {}
    for rule in ("importance", "softmax", "argmax"):
        sampler = NoiseSelectingSampler(rater, num_candidates=n, selection=rule, temperature=1.0)
        noise, w = sampler(x0, t, generator=torch.Generator().manual_seed(21), return_weights=True)
        results[rule] = {k: (w.double() * v, ev) for k, (v, ev) in fs(noise).items()}

    for k, (vals, ev) in results["importance"].items():
        se = vals.std().item() / math.sqrt(m)
        assert abs(vals.mean().item() - ev) < 4 * se + 1e-12, (k, vals.mean().item(), se)
    # selection without weights is biased on |eps|^2/d: max of 8 standardised scores is ~ +1.4 sigma
    for rule in ("argmax", "softmax"):
        vals, ev = results[rule]["|eps|^2/d"]
        se = vals.std().item() / math.sqrt(m)
        assert vals.mean().item() - ev > 10 * se, (rule, vals.mean().item(), se)
    argmax_vals, _ = results["argmax"]["|eps|^2/d"]
    assert argmax_vals.mean().item() > 1.15


def test_non_finite_scores_raise():
    sampler = NoiseSelectingSampler(NormRater(nan=True), num_candidates=2)
    with pytest.raises(FloatingPointError):
        sampler(torch.zeros(2, C, H, W), torch.tensor([1, 2]))


# --------------------------------------------------------------------------------------------------
# NoiseSelectingSampler: interface
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["argmax", "softmax", "importance"])
def test_generator_determinism(rule):
    sampler = NoiseSelectingSampler(tiny_rater(dtype=torch.float32), num_candidates=4, selection=rule,
                                    temperature=0.05)
    x0 = make_x0(5, seed=6, dtype=torch.float32)
    t = torch.tensor([1, 10, 100, 500, 999])
    a, wa = sampler(x0, t, generator=torch.Generator().manual_seed(1), return_weights=True)
    b, wb = sampler(x0, t, generator=torch.Generator().manual_seed(1), return_weights=True)
    c = sampler(x0, t, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.equal(wa, wb)
    assert not torch.allclose(a, c)
    # the selected noises are drawn from randn with that generator
    cands = torch.randn(5, 4, C, H, W, generator=torch.Generator().manual_seed(1))
    match_index(a, cands)


@pytest.mark.parametrize("rule", ["argmax", "softmax", "importance"])
@pytest.mark.parametrize("rater_dtype", [torch.float32, torch.float64])
def test_follows_x0_dtype_and_device(rule, rater_dtype):
    sampler = NoiseSelectingSampler(tiny_rater(dtype=rater_dtype), num_candidates=3, selection=rule)
    for dtype in (torch.float64, torch.float32):
        x0 = make_x0(2, dtype=dtype)
        noise, w = sampler(x0, torch.tensor([5, 6]), generator=torch.Generator().manual_seed(0),
                           return_weights=True)
        assert noise.dtype == dtype and w.dtype == dtype
        assert noise.device == x0.device and w.device == x0.device
        assert noise.shape == x0.shape and w.shape == (2,)
        noise_only = sampler(x0, torch.tensor([5, 6]), generator=torch.Generator().manual_seed(0))
        assert torch.is_tensor(noise_only) and torch.equal(noise_only, noise)


def test_timesteps_as_scalar():
    rater = tiny_rater()
    b, n = 3, 4
    x0 = make_x0(b, seed=8)
    cands = torch.randn(b, n, C, H, W, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sampler = NoiseSelectingSampler(rater, num_candidates=n, chunk_size=5)
    ref = sampler.score_candidates(x0, torch.full((b,), 37), cands)
    for t in (37, torch.tensor(37), torch.tensor([37])):
        torch.testing.assert_close(sampler.score_candidates(x0, t, cands), ref)
        assert torch.equal(sampler.select(x0, t, cands), sampler.select(x0, torch.full((b,), 37), cands))
    # the timestep matters, so the checks above are not vacuous
    assert not torch.allclose(sampler.score_candidates(x0, 900, cands), ref)
    np.testing.assert_allclose(ref.numpy(), loop_scores(rater, x0, 37, cands).numpy(), rtol=1e-5, atol=1e-6)


def test_class_conditional_rater():
    rater = tiny_rater(num_class_embeds=3)
    b, n = 4, 5
    x0 = make_x0(b, seed=10)
    t = torch.tensor([20, 200, 400, 600])
    labels = torch.tensor([0, 2, 1, 2])
    cands = torch.randn(b, n, C, H, W, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    sampler = NoiseSelectingSampler(rater, num_candidates=n, chunk_size=3)
    ref = loop_scores(rater, x0, t, cands, labels)
    np.testing.assert_allclose(sampler.score_candidates(x0, t, cands, labels).numpy(), ref.numpy(),
                               rtol=1e-5, atol=1e-6)
    noise = sampler.select(x0, t, cands, class_labels=labels)
    assert torch.equal(noise, cands[torch.arange(b), ref.argmax(1)])
    other = sampler.score_candidates(x0, t, cands, (labels + 1) % 3)
    assert not torch.allclose(other.double(), ref.float().double())
    with pytest.raises(ValueError):
        sampler.select(x0, t, cands)
    assert sampler(x0, t, class_labels=labels, generator=torch.Generator().manual_seed(0)).shape == x0.shape


def test_from_pretrained_gives_identical_selections(tmp_path):
    rater = tiny_rater(dtype=torch.float32)
    rater.save_pretrained(tmp_path)
    kwargs = dict(num_candidates=6, selection="softmax", temperature=0.05, chunk_size=5)
    loaded = NoiseSelectingSampler.from_pretrained(str(tmp_path), **kwargs)
    assert isinstance(loaded.rater, NoiseRaterModel)
    assert (loaded.num_candidates, loaded.selection, loaded.temperature, loaded.chunk_size) == (6, "softmax", 0.05, 5)
    assert not loaded.rater.training
    assert not any(p.requires_grad for p in loaded.rater.parameters())
    orig = NoiseSelectingSampler(rater, **kwargs)
    x0 = make_x0(4, seed=13, dtype=torch.float32)
    t = torch.tensor([0, 1, 500, 999])
    a = orig(x0, t, generator=torch.Generator().manual_seed(4))
    b = loaded(x0, t, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    l64 = NoiseSelectingSampler.from_pretrained(tmp_path, torch_dtype=torch.float64, device="cpu")
    assert next(l64.rater.parameters()).dtype == torch.float64


def test_bad_arguments_raise():
    rater = tiny_rater()
    for kwargs in (dict(selection="top1"), dict(num_candidates=0), dict(temperature=0.0),
                   dict(temperature=-1.0), dict(chunk_size=0)):
        with pytest.raises(ValueError):
            NoiseSelectingSampler(rater, **kwargs)
    sampler = NoiseSelectingSampler(rater, num_candidates=2)
    x0 = make_x0(2)
    with pytest.raises(ValueError):  # candidates of another image size
        sampler.select(x0, torch.tensor([1, 2]), torch.randn(2, 2, C, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError):
        KNNNoiseSampler(num_candidates=0)


# --------------------------------------------------------------------------------------------------
# KNN, assignment, uniform
# --------------------------------------------------------------------------------------------------


def test_knn_picks_nearest_candidate():
    b, n = 4, 7
    x0 = make_x0(b, seed=14)
    knn = KNNNoiseSampler(num_candidates=n)
    noise = knn(x0, generator=torch.Generator().manual_seed(15))
    cands = torch.randn(b, n, C, H, W, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    for i in range(b):
        dists = [float(((cands[i, j] - x0[i]) ** 2).sum()) for j in range(n)]
        assert torch.equal(noise[i], cands[i, int(np.argmin(dists))])
    sel, w = knn.select(x0, None, cands, return_weights=True)
    assert torch.equal(sel, noise) and torch.equal(w, torch.ones(b, dtype=torch.float64))
    # nearer on average than the first draw
    assert ((noise - x0) ** 2).sum() < ((cands[:, 0] - x0) ** 2).sum()


def test_knn_with_one_candidate_is_plain_randn():
    x0 = make_x0(3, seed=16)
    noise = KNNNoiseSampler(num_candidates=1)(x0, generator=torch.Generator().manual_seed(17))
    assert torch.equal(noise, torch.randn(x0.shape, generator=torch.Generator().manual_seed(17), dtype=torch.float64))


def test_assignment_is_brute_force_optimal_permutation():
    b = 5
    x0 = make_x0(b, seed=18)
    noise, w = AssignmentNoiseSampler()(x0, generator=torch.Generator().manual_seed(19), return_weights=True)
    assert torch.equal(w, torch.ones(b, dtype=torch.float64))
    drawn = torch.randn(x0.shape, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    perm = match_index(noise, drawn.unsqueeze(0).expand(b, -1, -1, -1, -1)).tolist()
    assert sorted(perm) == list(range(b))  # a permutation of the drawn noises
    cost = ((x0.unsqueeze(1) - drawn.unsqueeze(0)) ** 2).flatten(2).sum(-1).numpy()  # cost[i, j]
    totals = {p: sum(cost[i, p[i]] for i in range(b)) for p in itertools.permutations(range(b))}
    best = min(totals.values())
    assert totals[tuple(perm)] == pytest.approx(best, rel=1e-12)
    assert totals[tuple(range(b))] > best + 1e-6  # identity is not optimal here: the check has power
    # select on given candidates agrees
    assert torch.equal(AssignmentNoiseSampler().select(x0, None, drawn), noise)


def test_assignment_batch_of_one_is_unchanged():
    x0 = make_x0(1, seed=20)
    noise = AssignmentNoiseSampler()(x0, generator=torch.Generator().manual_seed(21))
    assert torch.equal(noise, torch.randn(x0.shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_sampler(dtype):
    x0 = make_x0(3, dtype=dtype)
    noise, w = UniformNoiseSampler()(x0, torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(22),
                                     return_weights=True)
    assert torch.equal(noise, torch.randn(x0.shape, generator=torch.Generator().manual_seed(22), dtype=dtype))
    assert torch.equal(w, torch.ones(3, dtype=dtype))
    assert torch.is_tensor(UniformNoiseSampler()(x0))


def test_build_noise_sampler(tmp_path):
    assert isinstance(build_noise_sampler("uniform"), UniformNoiseSampler)
    knn = build_noise_sampler("knn", num_candidates=5)
    assert isinstance(knn, KNNNoiseSampler) and knn.num_candidates == 5
    assert isinstance(build_noise_sampler("assignment"), AssignmentNoiseSampler)
    tiny_rater(dtype=torch.float32).save_pretrained(tmp_path)
    s = build_noise_sampler("rater", num_candidates=3, rater_model_name_or_path=str(tmp_path),
                            selection_rule="importance", temperature=0.5, device="cpu")
    assert isinstance(s, NoiseSelectingSampler) and isinstance(s.rater, NoiseRaterModel)
    assert (s.num_candidates, s.selection, s.temperature) == (3, "importance", 0.5)
    with pytest.raises(ValueError):
        build_noise_sampler("rater")
    with pytest.raises(ValueError):
        build_noise_sampler("rater", rater_model_name_or_path="")
    with pytest.raises(ValueError):
        build_noise_sampler("gaussian")
