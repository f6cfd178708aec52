"""merge_adapters.py: the TIES merge of LoRA adapters equals an independent hand computation and peft's own result;
bad input is one line on stderr, exit 2, nothing written.

The hand computation reads the saved adapter and base files directly (safetensors + adapter_config.json) and
implements TIES as peft 0.21's merge_utils.ties defines it: keep each tensor's int(density * numel) largest
magnitudes, elect the sign of the sum of the kept (unweighted) entries, then average the weighted kept entries that
agree with it (sum / number agreeing). Which tensors it is applied to depends on the combination type: the LoRA
factors for ``ties`` (weights sqrt(w * alpha / r)), the full deltas for ``ties_svd``.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cli
import merge_adapters
from conftest import ROOT, check_one_line_error, snapshot

DENSITY = 0.5  # trims half of every tensor, so trimming, sign election and the disjoint mean all matter
WEIGHTS = [0.7, 1.3]


def make_adapter(base_dir, adapter_dir, r, alpha, seed):
    """A LoRA adapter on all linear layers of the tiny base whose A and B are random (B is zero after init)."""
    from transformers import AutoModelForCausalLM

    import modeling

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = modeling.add_lora(model, r=r, alpha=alpha, dropout=0.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(adapter_dir)
    return str(adapter_dir)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    """Two different rank-4 adapters (alpha 8 and 4, so their scalings differ) and one of rank 8. Read-only."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(tiny_model_dir, root / "run_a" / "adapter", r=4, alpha=8, seed=1),
            "b": make_adapter(tiny_model_dir, root / "run_b" / "adapter", r=4, alpha=4, seed=2),
            "r8": make_adapter(tiny_model_dir, root / "run_c" / "adapter", r=8, alpha=16, seed=3)}


def lora_factors(adapter_dir):
    """{base weight name: (A, B)} and alpha / r, read from the adapter's own files (not through peft)."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    factors = {}
    for key, value in load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items():
        # base_model.model.model.layers.0.mlp.up_proj.lora_A.weight -> model.layers.0.mlp.up_proj.weight
        module, part = key.rsplit(".lora_", 1)
        factors.setdefault(module.removeprefix("base_model.model.") + ".weight", {})[part[0]] = value
    return {name: (f["A"], f["B"]) for name, f in factors.items()}, config["lora_alpha"] / config["r"]


def hand_ties(tensors, weights, density):
    """TIES by hand (float64): trim to the top-density magnitudes, elect signs, disjoint mean of the weighted."""
    kept = []
    for tensor in tensors:
        tensor = tensor.double()
        order = tensor.abs().flatten().argsort(descending=True)
        mask = torch.zeros(tensor.numel(), dtype=torch.bool)
        mask[order[:int(density * tensor.numel())]] = True
        kept.append(torch.where(mask.view(tensor.shape), tensor, torch.zeros_like(tensor)))
    elected = torch.where(sum(kept) >= 0, 1.0, -1.0).double()
    total, agreeing = torch.zeros_like(kept[0]), torch.zeros_like(kept[0])
    for tensor, weight in zip(kept, weights):
        agrees = torch.sign(tensor) == elected  # a trimmed entry (0) agrees with neither sign
        total += torch.where(agrees, weight * tensor, torch.zeros_like(tensor))
        agreeing += agrees.double()
    return total / agreeing.clamp(min=1)


def expected_merge(base_dir, adapter_dirs, weights, density, combination_type):
    """The merged model's weights by hand: base + the TIES-merged LoRA delta of every adapted linear layer."""
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    per_adapter = [lora_factors(path) for path in adapter_dirs]
    expected = {name: value.double() for name, value in base.items()}
    for name in per_adapter[0][0]:
        if combination_type == "ties":
            # factors merged separately, each adapter weighted by sqrt(w * scaling); the merged scaling is 1
            scales = [math.sqrt(w * scaling) for w, (_, scaling) in zip(weights, per_adapter)]
            a = hand_ties([factors[name][0] for factors, _ in per_adapter], scales, density)
            b = hand_ties([factors[name][1] for factors, _ in per_adapter], scales, density)
            delta = b @ a
        else:  # ties_svd at full rank: TIES of the deltas themselves, the SVD re-factorisation is then exact
            # delta_i = B_i @ A_i * scaling_i in float32, as peft forms it, so the trim sees the same numbers
            deltas = [(factors[name][1] @ factors[name][0]) * scaling for factors, scaling in per_adapter]
            delta = hand_ties(deltas, weights, density)
        expected[name] = expected[name] + delta
    return base, expected


@pytest.mark.parametrize("combination_type, svd_rank", [("ties", None), ("ties_svd", 64)])
def test_merge_equals_hand_ties(combination_type, svd_rank, adapters, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    summary = merge_adapters.merge_adapters(tiny_model_dir, [adapters["a"], adapters["b"]], str(out),
                                            weights=WEIGHTS, density=DENSITY, combination_type=combination_type,
                                            svd_rank=svd_rank)
    assert summary["weights"] == WEIGHTS and summary["svd_rank"] == svd_rank

    base, expected = expected_merge(tiny_model_dir, [adapters["a"], adapters["b"]], WEIGHTS, DENSITY,
                                    combination_type)
    merged = load_file(out / "model.safetensors")
    adapted = set(lora_factors(adapters["a"])[0])
    assert len(adapted) == 14  # q, k, v, o, gate, up, down in each of the 2 layers: all-linear, no lm_head
    assert set(merged) == set(base)
    for name, value in merged.items():
        if name in adapted:
            torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6, msg=name)
            assert not torch.equal(value, base[name])
        else:
            assert torch.equal(value, base[name]), name  # embeddings, norms, lm_head untouched

    # the merge is neither input alone (the two adapters really differ and both count)
    for alone in ([1.0, 0.0], [0.0, 1.0]):
        _, single = expected_merge(tiny_model_dir, [adapters["a"], adapters["b"]], alone, DENSITY, combination_type)
        name = "model.layers.0.mlp.up_proj.weight"
        assert (expected[name] - single[name]).abs().max() > 1e-3

    # a complete, loadable model dir, published with nothing left beside it
    from transformers import AutoModelForCausalLM

    import modeling

    AutoModelForCausalLM.from_pretrained(out)
    modeling.load_tokenizer(str(out))
    assert (out / merge_adapters.MERGE_MARKER).is_file()
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_ties_svd_at_the_default_rank_is_a_low_rank_approximation(adapters, tiny_model_dir, tmp_path):
    """Without --svd_rank peft re-factorises the TIES delta at the inputs' rank (4 here): not the exact TIES."""
    out = tmp_path / "merged"
    summary = merge_adapters.merge_adapters(tiny_model_dir, [adapters["a"], adapters["b"]], str(out),
                                            weights=WEIGHTS, density=DENSITY, combination_type="ties_svd")
    assert summary["svd_rank"] == 4
    base, expected = expected_merge(tiny_model_dir, [adapters["a"], adapters["b"]], WEIGHTS, DENSITY, "ties_svd")
    name = "model.layers.0.mlp.up_proj.weight"
    delta = load_file(out / "model.safetensors")[name].double() - base[name].double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-4) == 4
    assert (delta - (expected[name] - base[name].double())).abs().max() > 1e-2


def test_merge_equals_peft_directly(adapters, tiny_model_dir, tmp_path):
    """The defaults (ties, density 0.8, weights 1, 1: ZJUKLAB's merge) give what peft's own calls give."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    merge_adapters.main(["--base_model", tiny_model_dir, "--adapters", f"{adapters['a']},{adapters['b']}",
                         "--output_dir", str(out)])

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters["a"],
                                      adapter_name="first")
    model.load_adapter(adapters["b"], adapter_name="second")
    model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "ties", combination_type="ties", density=0.8)
    model.set_adapter("ties")
    direct = model.merge_and_unload().state_dict()

    merged = load_file(out / "model.safetensors")
    assert set(merged) <= set(direct)
    for name, value in merged.items():
        torch.testing.assert_close(value, direct[name], rtol=0, atol=1e-7, msg=name)


# --- bad input ----------------------------------------------------------------------------------------------------

def bad_cases(adapters, base, out, tmp_path):
    """name -> (argv, fragments the one error line must contain)."""
    a, b = adapters["a"], adapters["b"]
    empty = tmp_path / "not_an_adapter"
    empty.mkdir()
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / merge_adapters.MERGE_MARKER).write_text("base_model: x\n")

    def argv(*extra, adapter_list=f"{a},{b}", output=out):
        return ["--base_model", base, "--adapters", adapter_list, "--output_dir", output, *extra]

    run_a = os.path.dirname(a)
    return {
        "no-adapter-config": (argv(adapter_list=f"{a},{empty}"), [str(empty), "no adapter_config.json"]),
        "one-adapter": (argv(adapter_list=a), ["got 1 adapter dir(s), need at least 2"]),
        "weights-count": (argv("--weights", "1,1,1"), ["3 weight(s) for 2 adapters"]),
        "weights-not-numbers": (argv("--weights", "1,x"), ["--weights 1,x", "comma-separated numbers"]),
        "density-zero": (argv("--density", "0"), ["--density 0", "must be in (0, 1]"]),
        "density-above-one": (argv("--density", "1.5"), ["--density 1.5", "must be in (0, 1]"]),
        "output-is-a-run-dir": (argv(output=run_a), [f"--output_dir {run_a}", "overlaps the input"]),
        "output-is-the-base": (argv(output=base), [f"--output_dir {base}", "overlaps the input"]),
        "output-holds-a-merge": (argv(output=str(finished)), ["already holds a finished run (merge_config.yaml)"]),
        "unknown-combination": (argv("--combination_type", "average"), ["--combination_type average"]),
        "unknown-dtype": (argv("--torch_dtype", "fp8"), ["--torch_dtype fp8", "expected one of"]),
        "ranks-differ": (argv(adapter_list=f"{a},{adapters['r8']}"), ["ranks [4, 8] differ", "ties_svd"]),
        "svd-rank-without-svd": (argv("--svd_rank", "8"), ["--svd_rank 8", "only the svd types"]),
        "svd-rank-too-large": (argv("--combination_type", "ties_svd", "--svd_rank", "65"),
                               ["--svd_rank 65", "smallest adapted layer dimension (64)"]),
    }


CASE_NAMES = ["no-adapter-config", "one-adapter", "weights-count", "weights-not-numbers", "density-zero",
              "density-above-one", "output-is-a-run-dir", "output-is-the-base", "output-holds-a-merge",
              "unknown-combination", "unknown-dtype", "ranks-differ", "svd-rank-without-svd", "svd-rank-too-large"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(name, adapters, tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv, fragments = bad_cases(adapters, tiny_model_dir, out, tmp_path)[name]
    roots = (tmp_path, tiny_model_dir, os.path.dirname(os.path.dirname(adapters["a"])))
    before = snapshot(*roots)
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        cli.run_main(lambda: merge_adapters.main(argv))
    check_one_line_error(excinfo.value.code, capsys.readouterr().err, fragments)
    assert snapshot(*roots) == before  # nothing written (no staging dir either), no input changed
    assert not os.path.exists(out)


@pytest.mark.slow
def test_bad_input_as_a_real_process(adapters, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    before = snapshot(tmp_path, tiny_model_dir)
    process = subprocess.run([sys.executable, os.path.join(ROOT, "merge_adapters.py"), "--base_model", tiny_model_dir,
                              "--adapters", f"{adapters['a']},{adapters['b']}", "--density", "1.5",
                              "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    check_one_line_error(process.returncode, process.stderr, ["--density 1.5", "must be in (0, 1]"])
    assert process.stdout == ""
    assert snapshot(tmp_path, tiny_model_dir) == before
    assert not out.exists()
