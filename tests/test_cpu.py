"""The CPU decision on recorded flag sets of the machines this project met, and its overrides."""

import pytest

from prunedlora import cpu as cpumod
from prunedlora.cpu import BIND_VAR, RESERVED_VAR, decide, machine_line, machine_record, parse_cpuinfo

# Abridged /proc/cpuinfo of real machines (model name and the flags around the ones that matter).
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
AVX512_NO_BF16 = """model name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni
"""
AVX512_BF16 = """model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16
"""
AMX = """model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
# aarch64 lists "Features" and no model name (Graviton 3: bf16 extension).
ARM_BF16 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve bf16 i8mm
CPU implementer\t: 0x41
"""


def cpu(text, cores=2, arch="x86_64"):
    return parse_cpuinfo(text, tuple(range(cores)), arch)


@pytest.mark.parametrize(
    "text, native, flags",
    [
        (AVX2_ONLY, False, ["avx2"]),
        (AVX512_NO_BF16, False, ["avx2", "avx512f"]),
        (AVX512_BF16, True, ["avx2", "avx512f", "avx512_bf16"]),
        (AMX, True, ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]),
    ],
)
def test_auto_dtype_is_bf16_only_where_native(text, native, flags):
    info = cpu(text)
    assert info.native_bf16 is native
    assert info.relevant_flags == flags
    choice = decide(info, "auto", env={})
    assert choice.dtype == ("bfloat16" if native else "float32")
    assert cpumod.autocast_bf16(info) is native


def test_parse_reads_the_first_model_name_and_aarch64_features():
    assert cpu(AVX2_ONLY).model == "AMD EPYC 7B12"
    arm = cpu(ARM_BF16, arch="aarch64")
    assert arm.native_bf16 and arm.relevant_flags == ["bf16"]
    assert arm.model  # no model name line: falls back to something, never empty


def test_explicit_dtype_wins_over_the_cpu():
    assert decide(cpu(AVX2_ONLY), "bfloat16", env={}).dtype == "bfloat16"
    assert decide(cpu(AMX), "float32", env={}).dtype == "float32"
    assert decide(cpu(AMX), "float16", env={}).dtype_reason == "--dtype"


def test_few_cores_are_all_bound_and_applied_without_replacing():
    choice = decide(parse_cpuinfo(AVX2_ONLY, (0, 1, 2, 5)), "auto", env={})
    assert choice.env == {BIND_VAR: "0-2,5"}
    env = {"OTHER": "x"}
    assert choice.apply(env) == {"OTHER": "x", BIND_VAR: "0-2,5"}
    assert choice.apply({BIND_VAR: "0"})[BIND_VAR] == "0"


@pytest.mark.parametrize("var, value", [(BIND_VAR, "auto"), (BIND_VAR, "0"), (RESERVED_VAR, "0")])
def test_user_binding_variables_win(var, value):
    choice = decide(cpu(AVX2_ONLY), "auto", env={var: value})
    assert choice.env == {}
    assert f"{var}={value} (yours)" in choice.binding


def test_many_cores_or_tensor_parallel_keep_vllms_binding():
    assert decide(cpu(AMX, cores=cpumod.FEW_CORES + 1), env={}).env == {}
    assert decide(cpu(AMX, cores=4), env={}, world_size=2).env == {}
    assert decide(cpu(AMX, cores=cpumod.FEW_CORES), env={}).env == {BIND_VAR: f"0-{cpumod.FEW_CORES - 1}"}


def test_one_line_report_says_cpu_flags_dtype_and_binding():
    line = decide(cpu(AVX2_ONLY), "auto", env={}).line()
    assert "\n" not in line
    assert line == (
        "cpu: AMD EPYC 7B12 (avx2), 2 cores -> dtype float32 (auto: no native bf16, float32 is faster); "
        f"threads: all 2 cores bound ({BIND_VAR}=0-1)"
    )
    assert "dtype bfloat16 (auto: native bf16)" in decide(cpu(AMX), "auto", env={}).line()


def test_machine_record_holds_what_decides_the_figures():
    choice = decide(cpu(AVX512_NO_BF16, cores=2), "auto", env={})
    record = machine_record(choice)
    assert record["cpu"].startswith("Intel(R) Xeon(R) Platinum 8259CL")
    assert record["flags"] == ["avx2", "avx512f"] and record["native_bf16"] is False
    assert record["cores"] == 2 and record["dtype"] == "float32"
    assert record["thread_binding"] == choice.binding and record["vllm_env"] == {BIND_VAR: "0-1"}
    assert record["description"] == machine_line(record)
    assert "avx512f" in record["description"] and "float32" in record["description"]
    torch_record = machine_record(cpu=cpu(AVX2_ONLY), dtype="float32", threads="torch, 2 threads")
    assert torch_record["dtype"] == "float32" and torch_record["thread_binding"] == "torch, 2 threads"
    assert machine_line("Intel(R) Xeon(R) Processor, 2 cores") == "Intel(R) Xeon(R) Processor, 2 cores"


def test_this_machine_is_read():
    info = cpumod.read_cpu_info()
    assert info.cores >= 1 and info.model
