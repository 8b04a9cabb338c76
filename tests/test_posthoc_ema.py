"""ambient_dist.posthoc_ema: the power-function profiles against numbers computed independently
here (numerical integration with scipy), the least-squares fit, the assembly of ZeRO slices,
and the errors a user can cause."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import integrate

from ambient_dist.posthoc_ema import (SIGMA_REL_MAX, SNAPSHOT_DIR, PosthocEMAError, gamma_from_sigma_rel,
                                      list_snapshots, power_beta, profile_inner, reconstruct,
                                      sigma_rel_from_gamma, snapshot_name, solve_coefficients,
                                      write_snapshot_meta, write_snapshot_part)


def density(t, gamma):
    """The power-function profile at time t, straight from its definition (no closed forms)."""
    return lambda tau: (gamma + 1) * tau ** gamma / t ** (gamma + 1) if 0 <= tau <= t else 0.0


def quad(f, hi, points=()):
    return integrate.quad(f, 0, hi, points=list(points) or None, limit=500, epsabs=0, epsrel=1e-12)[0]


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.08, 0.10, 0.2, 0.28])
def test_gamma_gives_a_profile_of_that_relative_width(sigma_rel):
    gamma = gamma_from_sigma_rel(sigma_rel)
    p = density(1.0, gamma)
    mean = quad(lambda tau: tau * p(tau), 1.0)
    var = quad(lambda tau: (tau - mean) ** 2 * p(tau), 1.0)
    assert quad(p, 1.0) == pytest.approx(1.0, rel=1e-10)
    assert math.sqrt(var) == pytest.approx(sigma_rel, rel=1e-8)
    assert gamma > 0 and sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)


def test_gamma_of_edm2s_two_tracked_profiles():
    # The paper's section 3.1 pairs sigma_rel 0.05 and 0.10 with exponents 16.97 and 6.94.
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("bad", [0.0, -0.1, SIGMA_REL_MAX, 0.3, float("nan")])
def test_sigma_rel_outside_its_range_is_refused(bad):
    with pytest.raises(PosthocEMAError, match=r"must be in \(0, 0\.2887\)"):
        gamma_from_sigma_rel(bad)


@pytest.mark.parametrize("t_a, s_a, t_b, s_b", [(1000, 0.05, 3000, 0.10), (3000, 0.05, 1000, 0.10),
                                                (2000, 0.10, 2000, 0.10), (500, 0.2, 4000, 0.03)])
def test_inner_products_of_profiles_match_numerical_integration(t_a, s_a, t_b, s_b):
    g_a, g_b = gamma_from_sigma_rel(s_a), gamma_from_sigma_rel(s_b)
    pa, pb = density(t_a, g_a), density(t_b, g_b)
    reference = quad(lambda tau: pa(tau) * pb(tau), min(t_a, t_b))
    assert float(profile_inner(t_a, g_a, t_b, g_b)) == pytest.approx(reference, rel=1e-9)


def test_the_tracked_ema_weighs_each_step_by_the_profiles_integral_over_it():
    # Track one-hot "weights" (step k contributes e_k): the EMA then holds each step's weight.
    gamma, batch, steps = gamma_from_sigma_rel(0.10), 8, 40
    ema = torch.zeros(steps, dtype=torch.float64)
    for k in range(steps):
        beta = power_beta(gamma, (k + 1) * batch, batch)
        ema.mul_(beta).add_(torch.nn.functional.one_hot(torch.tensor(k), steps).double(), alpha=1 - beta)
    t = steps * batch
    p = density(t, gamma)
    reference = [quad(p, (k + 1) * batch) - quad(p, k * batch) for k in range(steps)]
    np.testing.assert_allclose(ema.numpy(), reference, rtol=1e-9, atol=1e-15)
    assert power_beta(gamma, batch, batch) == 0.0   # the first step: the EMA is the weights


def _grid_gram(times, gammas, target_t, target_g):
    """The normal equations of the fit, by numerical integration (independent of the code)."""
    ps = [density(t, g) for t, g in zip(times, gammas)]
    q = density(target_t, target_g)
    cuts = sorted(set(times) | {target_t})
    inner = lambda f, g, hi: quad(lambda tau: f(tau) * g(tau), hi, [c for c in cuts if c < hi])  # noqa: E731
    A = np.array([[inner(pi, pj, min(ti, tj)) for pj, tj in zip(ps, times)] for pi, ti in zip(ps, times)])
    b = np.array([inner(pi, q, min(ti, target_t)) for pi, ti in zip(ps, times)])
    return A, b, inner(q, q, target_t), ps, q


def test_coefficients_and_fit_error_match_a_numerically_integrated_least_squares_fit():
    times = [1000, 1000, 2000, 2000, 3000, 3000]
    gammas = [gamma_from_sigma_rel(s) for s in (0.05, 0.10) * 3]
    target_g = gamma_from_sigma_rel(0.08)
    x, err = solve_coefficients(times, gammas, [3000], [target_g])
    A, b, qq, ps, q = _grid_gram(times, gammas, 3000, target_g)
    reference = np.linalg.solve(A, b)
    reference /= reference.sum()
    np.testing.assert_allclose(x[:, 0], reference, rtol=1e-6, atol=1e-9)
    assert x[:, 0].sum() == pytest.approx(1.0)
    fitted = lambda tau: sum(c * p(tau) for c, p in zip(reference, ps))  # noqa: E731
    residual = quad(lambda tau: (fitted(tau) - q(tau)) ** 2, 3000, [1000, 2000])
    assert err[0] == pytest.approx(math.sqrt(residual / qq), rel=1e-5)
    assert 1e-4 < err[0] < 0.5   # 0.08 lies between the tracked widths: close, not exact


def test_a_tracked_profile_is_its_own_reconstruction():
    times = [1000, 1000, 2000, 2000]
    gammas = [gamma_from_sigma_rel(s) for s in (0.05, 0.10) * 2]
    x, err = solve_coefficients(times, gammas, [2000, 2000], [gammas[2], gammas[3]])
    np.testing.assert_allclose(x, np.eye(4)[:, 2:], atol=1e-12)
    assert err.max() < 1e-6


# -- snapshots on disk ---------------------------------------------------------------------

SHAPES = {"w": (5, 3), "b": (7,), "scale": (2,)}


def _trajectory(steps: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} | {"count": torch.tensor(i)}
            for i in range(steps)]


def _write_run(run, trajectory, batch, every, sigma_rels, world):
    """Track the power EMAs of `trajectory` and snapshot them as `world` ZeRO-3 ranks would:
    each parameter flattened, cut into equal rank partitions (the last padded with zeros)."""
    gammas = [gamma_from_sigma_rel(s) for s in sigma_rels]
    emas = [{k: v.clone().float() for k, v in trajectory[0].items()} for _ in gammas]
    for step, live in enumerate(trajectory):
        images = (step + 1) * batch
        for gamma, ema in zip(gammas, emas):
            beta = power_beta(gamma, images, batch)
            for k, v in live.items():
                ema[k] = ema[k].lerp(v.float(), 1 - beta) if k != "count" else v.clone()
        if (step + 1) % every:
            continue
        path = run / SNAPSHOT_DIR / snapshot_name(images)
        for rank in range(world):
            layout, parts = {}, []
            for ema in emas:
                part = {}
                for k, v in ema.items():
                    if world == 1 or k == "count":
                        part[k] = v
                        continue
                    size = -(-v.numel() // world)
                    flat = torch.cat([v.reshape(-1), torch.zeros(size * world - v.numel())])
                    part[k] = flat[rank * size:(rank + 1) * size].clone()
                    layout[k] = (tuple(v.shape), rank * size, size)
                parts.append(part)
            write_snapshot_part(path, rank, parts, layout)
        write_snapshot_meta(path, {"images_seen": images, "batch": batch, "sigma_rels": sigma_rels,
                                   "gammas": gammas, "world_size": world, "fingerprint": "f"})
    return emas


def test_zero3_slices_assemble_to_the_single_process_reconstruction(tmp_path):
    trajectory = _trajectory(12)
    tracked = _write_run(tmp_path / "one", trajectory, 8, 3, [0.05, 0.10], world=1)
    _write_run(tmp_path / "three", trajectory, 8, 3, [0.05, 0.10], world=3)
    assert len(list_snapshots(tmp_path / "three")) == 4
    one = reconstruct(tmp_path / "one", [0.05, 0.07, 0.10])
    three = reconstruct(tmp_path / "three", [0.05, 0.07, 0.10])
    for s in (0.05, 0.07, 0.10):
        a, b = load_file(str(one[s][0])), load_file(str(three[s][0]))
        assert a.keys() == b.keys() == {"w", "b", "scale", "count"}
        for k in a:   # every element comes from exactly one rank: the same sums, to one ulp
            torch.testing.assert_close(a[k], b[k], rtol=1.2e-7, atol=0)
        assert one[s][1] == three[s][1]
    # The tracked profiles come back as tracked, to float32 round-off; integers as they were.
    for j, s in enumerate((0.05, 0.10)):
        got = load_file(str(three[s][0]))
        for k in SHAPES:
            torch.testing.assert_close(got[k], tracked[j][k], rtol=2e-7, atol=1e-7)
        assert got["count"].item() == 11 and three[s][1] < 1e-6
    record = json.loads(one[0.07][0].with_suffix(".json").read_text())
    assert record["images_seen"] == 96 and record["fit_error"] == one[0.07][1]
    assert len(record["snapshots"]) == 8
    assert sum(c["coefficient"] for c in record["snapshots"]) == pytest.approx(1.0)


def test_an_earlier_time_uses_only_the_snapshots_up_to_it(tmp_path):
    _write_run(tmp_path, _trajectory(12), 8, 3, [0.05, 0.10], world=1)
    (path, _), = reconstruct(tmp_path, [0.06], at_kimg=0.048).values()
    assert path.name == "ema-0.06-at-0.048kimg.safetensors"
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["images_seen"] == 48
    assert {c["images_seen"] for c in record["snapshots"]} == {24, 48}
    # at_kimg names the time training crossed: 0.045 kimg is the snapshot at 48 images (batch 8)
    (path, _), = reconstruct(tmp_path, [0.06], at_kimg=0.045).values()
    assert json.loads(path.with_suffix(".json").read_text())["images_seen"] == 48


def test_an_incomplete_snapshot_is_not_used(tmp_path):
    _write_run(tmp_path, _trajectory(6), 8, 3, [0.05, 0.10], world=2)
    (tmp_path / SNAPSHOT_DIR / snapshot_name(48) / "meta.json").unlink()   # died before meta.json
    assert [s.images_seen for s in list_snapshots(tmp_path)] == [24]
    (path, _), = reconstruct(tmp_path, [0.05]).values()
    assert json.loads(path.with_suffix(".json").read_text())["images_seen"] == 24


def test_bad_requests_name_what_is_wrong(tmp_path):
    with pytest.raises(PosthocEMAError, match="not found"):
        reconstruct(tmp_path / "nowhere", [0.05])
    with pytest.raises(PosthocEMAError, match="no EMA snapshots .* ema.kind=power"):
        reconstruct(tmp_path, [0.05])
    _write_run(tmp_path, _trajectory(6), 8, 3, [0.05, 0.10], world=1)
    with pytest.raises(PosthocEMAError, match=r"--sigma-rel 0.35: must be in \(0, 0.2887\)"):
        reconstruct(tmp_path, [0.05, 0.35])
    with pytest.raises(PosthocEMAError, match="--at-kimg 1: beyond training; the last snapshot .* 0.048 kimg"):
        reconstruct(tmp_path, [0.05], at_kimg=1)
    with pytest.raises(PosthocEMAError, match=r"--at-kimg 0.01: no snapshot .* \(kimg\) 0.024, 0.048"):
        reconstruct(tmp_path, [0.05], at_kimg=0.01)
    with pytest.raises(PosthocEMAError, match="--at-kimg -1: must be > 0"):
        reconstruct(tmp_path, [0.05], at_kimg=-1)
    assert not (tmp_path / "posthoc").exists() or not list((tmp_path / "posthoc").iterdir())


def test_damaged_snapshot_files_are_named(tmp_path):
    _write_run(tmp_path, _trajectory(6), 8, 3, [0.05, 0.10], world=2)
    snap = tmp_path / SNAPSHOT_DIR / snapshot_name(48)
    (snap / "rank00001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PosthocEMAError, match=r"snapshot file .*rank00001.safetensors: cannot be read"):
        reconstruct(tmp_path, [0.05])
    (snap / "meta.json").write_text("{")
    with pytest.raises(PosthocEMAError, match=r"snapshot .*snapshot-000000000048: meta.json is not"):
        reconstruct(tmp_path, [0.05])
    (snap / "meta.json").write_text('{"images_seen": 48}')
    with pytest.raises(PosthocEMAError, match="meta.json is not a snapshot's"):
        list_snapshots(tmp_path)
    with pytest.raises(PosthocEMAError, match="output directory .*: cannot be created"):
        (tmp_path / "file").write_text("x")
        (tmp_path / SNAPSHOT_DIR / snapshot_name(48)).rename(tmp_path / "moved")
        reconstruct(tmp_path, [0.05], out_dir=tmp_path / "file" / "sub")
