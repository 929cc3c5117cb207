"""The guidance modes are defined once (nova_fast/guidance_modes.py); every kernel spells them.

The Triton kernel imports the enum (and compares GUIDE with those names only, never with a bare
number); the CUDA and CPU kernels are C++, so their constants are read from the sources here.
"""
import re
from pathlib import Path

import pytest

from nova_fast.guidance_modes import PASSES, GuideMode
from nova_fast.ops import denoise_step

ROOT = Path(__file__).resolve().parents[1]
CPP_NAMES = {"kGuideNone": GuideMode.NONE, "kGuideCfg": GuideMode.CFG, "kGuideImage": GuideMode.IMAGE,
             "kGuideStg": GuideMode.STG}


def cpp_constants(text: str) -> dict:
    return {name: int(value) for name, value in re.findall(r"\b(kGuide\w+)\s*=\s*(\d+)", text)}


@pytest.mark.parametrize("source", ["csrc/denoise_step.cu", "csrc/cpu/denoise_step.cpp"])
def test_cpp_kernels_spell_the_enum(source):
    assert cpp_constants((ROOT / source).read_text()) == {k: int(v) for k, v in CPP_NAMES.items()}


def test_cpu_kernel_pass_counts_follow_the_enum():
    text = (ROOT / "csrc/cpu/denoise_step.cpp").read_text()
    (table,) = re.findall(r"passes\[\]\s*=\s*\{([^}]*)\}", text)
    assert [int(v) for v in table.split(",")] == [PASSES[m] for m in sorted(GuideMode)]
    (bound,) = re.findall(r"guide >= 0 && guide <= (\d+)", text)
    assert int(bound) == max(GuideMode)


def test_triton_kernel_uses_the_enum():
    pytest.importorskip("triton")
    from nova_fast.kernels import denoise_step as kernel

    assert [kernel.GUIDE_NONE.value, kernel.GUIDE_CFG.value, kernel.GUIDE_IMAGE.value, kernel.GUIDE_STG.value] == \
        [m.value for m in GuideMode]
    text = (ROOT / "kernels/denoise_step.py").read_text()
    assert not re.findall(r"GUIDE\s*[=!]=\s*\d", text), "compare GUIDE with the enum's names, not numbers"


def test_python_op_uses_the_enum():
    assert (denoise_step.GUIDE_NONE, denoise_step.GUIDE_CFG, denoise_step.GUIDE_IMAGE, denoise_step.GUIDE_STG) == \
        tuple(m.value for m in GuideMode)
    assert denoise_step.PASSES == {m.value: PASSES[m] for m in GuideMode}


def test_the_check_can_fail():
    assert cpp_constants("constexpr int kGuideNone = 0, kGuideCfg = 2;") != {k: int(v) for k, v in CPP_NAMES.items()}
