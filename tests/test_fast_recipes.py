"""Fast recipes: automatic precision, Keras layer options, training tricks, the airbench net."""
import json

import numpy as np
import pytest

from cnnlab import hardware


# precision chosen by the hardware ------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    ({"sse4_2", "avx2", "avx512f"}, "fp32"),          # AVX-512 without BF16: emulated
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"amx_tile", "amx_bf16"}, "bf16"),
    (set(), "fp32"),
])
def test_auto_precision_picks_bf16_only_where_native(flags, expected):
    choice = hardware.choose_precision("cpu", frozenset(flags))
    assert choice.precision == expected
    assert ("has native bf16" in choice.reason) == (expected == "bf16")


def test_auto_precision_on_cuda_follows_bf16_support():
    assert hardware.choose_precision("cuda", cuda_bf16=True).precision == "bf16"
    assert hardware.choose_precision("cuda", frozenset({"amx_bf16"}),
                                     cuda_bf16=False).precision == "fp32"


def test_cpu_flags_read_from_a_cpuinfo_file(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_bf16\n\n"
                 "processor\t: 1\nflags\t\t: fpu\n")
    assert hardware.cpu_flags(f) == {"fpu", "avx2", "amx_bf16"}
    assert hardware.cpu_model(f) == "Test CPU"
    assert hardware.cpu_flags(tmp_path / "absent") == frozenset()


def test_auto_precision_is_recorded_in_config_json(tmp_path):
    from cnnlab import Sequential
    from cnnlab.layers import Dense, Flatten, Input
    from cnnlab.training import fit
    x = np.random.default_rng(0).integers(0, 256, (16, 4, 4, 1), dtype=np.uint8)
    y = np.arange(16) % 2
    model = Sequential([Input((4, 4, 1)), Flatten(), Dense(2, activation="softmax")])
    fit(model, (x, y), epochs=1, batch_size=8, precision="auto", engine="torch",
        device="cpu", out=str(tmp_path / "run"), verbose=0)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    expected = hardware.auto_precision("cpu")
    assert config["train"]["precision"] == "auto"
    assert config["precision"] == {"chosen": expected.precision, "reason": expected.reason}
