"""Merge methods against results computed by hand on 4-element vectors."""

import math

import pytest
import torch

from slm_fusion.merging.methods import MERGE_METHODS, layer_index, resolve_param, tensor_generator

T = torch.tensor


def merge(method, tensors, base=None, weights=None, name="model.layers.0.mlp.up_proj.weight", seed=0, **params):
    return MERGE_METHODS[method]([T(t) for t in tensors], T(base) if base is not None else None, weights, params,
                                 name=name, generator_seed=seed)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=tol, rtol=0)


def test_registry_lists_every_method():
    assert set(MERGE_METHODS) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"}
    assert MERGE_METHODS["ties"].needs_base and not MERGE_METHODS["linear"].needs_base
    assert MERGE_METHODS["slerp"].n_models == 2


def test_linear_weighted_average_and_unnormalized_sum():
    a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]
    close(merge("linear", [a, b], weights=[1.0, 3.0]), [2.5, 2.0, 1.5, 1.0])  # (a + 3b) / 4
    close(merge("linear", [a, b], weights=[1.0, 3.0], normalize=False), [10.0, 8.0, 6.0, 4.0])


def test_task_arithmetic_adds_weighted_task_vectors_to_base():
    base = [1.0, 1.0, 1.0, 1.0]
    a = [2.0, 0.0, 1.0, 3.0]  # delta [1, -1, 0, 2]
    b = [1.0, 3.0, 1.0, 0.0]  # delta [0, 2, 0, -1]
    close(merge("task_arithmetic", [a, b], base, weights=[1.0, 0.5]), [2.0, 1.0, 1.0, 2.5])
    close(merge("task_arithmetic", [a, b], base, weights=[1.0, 0.5], **{"lambda": 2.0}), [3.0, 1.0, 1.0, 4.0])


def test_ties_elects_sign_by_mass_not_by_count():
    base = [1.0, 1.0, 1.0, 1.0]
    deltas = [[3.0, -2.0, 1.0, 0.5], [-1.0, -1.0, 2.0, -0.5], [-1.0, 4.0, -4.0, 0.0]]
    models = [[b + d for b, d in zip(base, delta)] for delta in deltas]
    # sums [1, 1, -1, 0] -> signs [+, +, -, 0]; entry 0: two of three models are negative, but the mass is positive,
    # so only +3 survives; entry 1: only +4 agrees; entry 2: only -4; entry 3: no sign, nothing kept.
    close(merge("ties", models, base), [1 + 3.0, 1 + 4.0, 1 - 4.0, 1 + 0.0])
    # the plain average would have been very different
    assert not torch.allclose(merge("ties", models, base), merge("task_arithmetic", models, base, weights=[1 / 3] * 3))


def test_ties_trims_to_density_and_weights_the_vote():
    base = [0.0, 0.0, 0.0, 0.0]
    t1 = [4.0, -3.0, 1.0, 0.5]  # density 0.5 keeps [4, -3, 0, 0]
    t2 = [-2.0, 0.1, 3.0, 1.0]  # keeps [-2, 0, 3, 0]
    close(merge("ties", [t1, t2], base, density=[0.5, 0.5]), [4.0, -3.0, 3.0, 0.0])
    # weights [1, 3]: weighted sums [-2, -3, 9, 0] -> entry 0 now elects '-', keeps -2 (weighted mean of agreeing)
    close(merge("ties", [t1, t2], base, weights=[1.0, 3.0], density=[0.5, 0.5]), [-2.0, -3.0, 3.0, 0.0])
    # normalize=False: weighted sum of agreeing entries, lambda scales it
    close(
        merge("ties", [t1, t2], base, weights=[1.0, 3.0], density=[0.5, 0.5], normalize=False, **{"lambda": 0.5}),
        [-3.0, -1.5, 4.5, 0.0],
    )


def test_dare_keeps_or_rescales_entries_and_is_reproducible():
    delta = torch.ones(10_000)
    base = torch.zeros(10_000)
    method = MERGE_METHODS["dare_linear"]
    out = method([delta], base, [1.0], {"density": [0.25]}, name="x", generator_seed=3)
    values = set(out.unique().tolist())
    assert values == {0.0, 4.0}  # dropped exactly, or rescaled by 1/density
    assert abs((out != 0).float().mean().item() - 0.25) < 0.02
    again = method([delta], base, [1.0], {"density": [0.25]}, name="x", generator_seed=3)
    assert torch.equal(out, again)
    other_name = method([delta], base, [1.0], {"density": [0.25]}, name="y", generator_seed=3)
    assert not torch.equal(out, other_name)  # each tensor gets its own mask, whatever the visiting order


def test_dare_rescale_preserves_the_task_vector_in_expectation():
    base = [0.0, 1.0, -1.0, 2.0]
    delta = [1.0, -2.0, 3.0, 0.5]
    model = [b + d for b, d in zip(base, delta)]
    runs = torch.stack(
        [merge("dare_linear", [model], base, density=[0.5], seed=seed) for seed in range(2000)]
    )
    close(runs.mean(0) - T(base), delta, tol=0.15)
    # the generator depends only on (seed, name, model index)
    assert tensor_generator(1, "a", 0).initial_seed() == tensor_generator(1, "a", 0).initial_seed()
    assert tensor_generator(1, "a", 0).initial_seed() != tensor_generator(1, "a", 1).initial_seed()


def test_dare_ties_without_dropping_is_ties():
    base = [1.0, 1.0, 1.0, 1.0]
    models = [[4.0, -1.0, 2.0, 1.5], [0.0, 0.0, 3.0, 0.5], [0.0, 5.0, -3.0, 1.0]]
    close(merge("dare_ties", models, base, density=[1.0] * 3), merge("ties", models, base).tolist())


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    v0, v1 = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]
    close(merge("slerp", [v0, v1], t=0.0), v0)
    close(merge("slerp", [v0, v1], t=1.0), v1)
    h = math.sqrt(0.5)
    close(merge("slerp", [v0, v1], t=0.5), [h, h, 0.0, 0.0])  # on the arc, not the chord's [0.5, 0.5]
    near = [2.0, 1e-3, 0.0, 0.0]  # cos ~ 1 - 1.25e-7: slerp's 1/sin(theta) is unstable, so lerp
    close(merge("slerp", [v0, near], t=0.5), [1.5, 5e-4, 0.0, 0.0])


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_merging_a_model_with_itself_returns_it(method):
    x = [0.3, -1.2, 2.5, 0.0]
    params = {"density": [0.5, 0.5]} if "density" in MERGE_METHODS[method].model_params else {}
    out = merge(method, [x, x], base=x if MERGE_METHODS[method].needs_base else None, weights=[0.4, 0.6]
                if method != "slerp" else None, **params)
    close(out, x)


def test_computes_in_float32_and_returns_requested_dtype():
    a = torch.tensor([1.0, 2.0], dtype=torch.float16)
    b = torch.tensor([3.0, 4.0], dtype=torch.float16)
    assert MERGE_METHODS["linear"]([a, b]).dtype == torch.float16
    out = MERGE_METHODS["linear"]([a, b], dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.tolist() == [2.0, 3.0]


def test_method_arity_and_base_are_checked():
    with pytest.raises(ValueError, match="exactly 2"):
        merge("slerp", [[1.0], [2.0], [3.0]])
    with pytest.raises(ValueError, match="base_model"):
        merge("ties", [[1.0], [2.0]])


def test_resolve_param_scalars_gradients_and_filters():
    assert resolve_param(0.7, "model.layers.3.mlp.up_proj.weight", 4) == 0.7
    assert resolve_param(True, "x", None) is True
    grad = [0.0, 1.0]
    assert resolve_param(grad, "model.layers.0.self_attn.q_proj.weight", 3) == 0.0
    assert resolve_param(grad, "model.layers.1.self_attn.q_proj.weight", 3) == pytest.approx(0.5)
    assert resolve_param(grad, "model.layers.2.self_attn.q_proj.weight", 3) == pytest.approx(1.0)
    # three anchors over five layers: layer 1 sits a quarter of the way, halfway between anchors 0 and 0.5
    assert resolve_param([0.0, 0.5, 1.0], "model.layers.1.mlp.down_proj.weight", 5) == pytest.approx(0.25)
    assert resolve_param([0.0, 0.5, 1.0], "model.layers.3.mlp.down_proj.weight", 5) == pytest.approx(0.75)
    # outside the layer stack: embeddings take the first anchor, the final norm / head the last
    assert resolve_param([0.2, 0.9], "model.embed_tokens.weight", 4) == pytest.approx(0.2)
    assert resolve_param([0.2, 0.9], "model.norm.weight", 4) == pytest.approx(0.9)
    assert resolve_param([0.2, 0.9], "lm_head.weight", 4) == pytest.approx(0.9)

    rules = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert resolve_param(rules, "model.layers.1.self_attn.q_proj.weight", 2) == 0.3
    assert resolve_param(rules, "model.layers.1.mlp.up_proj.weight", 2) == pytest.approx(1.0)
    assert resolve_param(rules, "model.layers.0.mlp.up_proj.weight", 2) == pytest.approx(0.0)
    assert resolve_param(rules, "model.norm.weight", 2) == 0.5
    first_wins = [{"filter": "proj", "value": 0.1}, {"filter": "q_proj", "value": 0.9}]
    assert resolve_param(first_wins, "model.layers.0.self_attn.q_proj.weight", 2) == 0.1
    with pytest.raises(ValueError, match="without `filter`"):
        resolve_param([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 2)


def test_layer_index_parses_hf_names():
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("model.embed_tokens.weight") is None
