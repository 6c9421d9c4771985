"""The full-integer int8 model as C source for microcontrollers (TensorFlow Lite Micro).

`--formats=tflite_int8_c` writes `model_data.h` and `model_data.cc`: the bytes of
`model_int8.tflite` as a 16-byte aligned array (`g_model_data`, `g_model_data_len`), and in
the header the operators the model uses, as a count for `tflite::MicroMutableOpResolver<N>`
and a macro that registers each one:

```c++
#include "model_data.h"

tflite::MicroMutableOpResolver<kModelOperatorCount> resolver;
PIBCONV_ADD_MODEL_OPERATORS(resolver);  // resolver.AddConv2D(); resolver.AddMean(); ...
const tflite::Model* model = tflite::GetModel(g_model_data);
```

Both files compile on their own with any C++11 compiler (`tests/test_deploy.py` runs
`cc -c`); the macro needs TensorFlow Lite Micro only where it is expanded.
"""

import pathlib

from pibconv_tf import files

C_ARRAY = "tflite_int8_c"
SOURCE = "model_data.cc"
HEADER = "model_data.h"
SYMBOL = "g_model_data"
_BYTES_PER_LINE = 12

# The builtin operators TensorFlow Lite Micro registers: the `Add*` methods of
# `tflite::MicroMutableOpResolver` in tensorflow/lite/micro/micro_mutable_op_resolver.h, the
# 2025 revision (TFLMRegistration API), read in 2026. Custom ops (the signal library's
# Signal*, CIRCULAR_BUFFER, ETHOSU, TFLite_Detection_PostProcess) are left out. GELU is not
# among them: porting it is an open request (tensorflow/tflite-micro issue #3218, open in
# January 2026). The one copy of the table (deploy/device_report.py reads it).
TFLM_BUILTIN_OPS = frozenset(
    """
    ABS ADD ADD_N ARG_MAX ARG_MIN ASSIGN_VARIABLE AVERAGE_POOL_2D BATCH_MATMUL BATCH_TO_SPACE_ND
    BROADCAST_ARGS BROADCAST_TO CALL_ONCE CAST CEIL CONCATENATION CONV_2D COS CUMSUM
    DEPTH_TO_SPACE DEPTHWISE_CONV_2D DEQUANTIZE DIV ELU EMBEDDING_LOOKUP EQUAL EXP EXPAND_DIMS
    FILL FLOOR FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GATHER_ND GREATER GREATER_EQUAL
    HARD_SWISH IF L2_NORMALIZATION L2_POOL_2D LEAKY_RELU LESS LESS_EQUAL LOG LOGICAL_AND
    LOGICAL_NOT LOGICAL_OR LOGISTIC LOG_SOFTMAX MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL
    NEG NOT_EQUAL PACK PAD PADV2 PRELU QUANTIZE READ_VARIABLE REDUCE_MAX REDUCE_MIN RELU RELU6
    RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR REVERSE_V2 ROUND RSQRT SELECT_V2 SHAPE SIN
    SLICE SOFTMAX SPACE_TO_BATCH_ND SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE
    SQUEEZE STRIDED_SLICE SUB SUM SVDF TANH TRANSPOSE TRANSPOSE_CONV
    UNIDIRECTIONAL_SEQUENCE_LSTM UNPACK VAR_HANDLE WHILE ZEROS_LIKE
    """.split()  # noqa: SIM905 (a table to read, not a list to edit)
)
# Resolver methods that do not follow the CamelCase rule of `resolver_method`.
_IRREGULAR_METHODS = {
    "BATCH_MATMUL": "AddBatchMatMul",
    "CUMSUM": "AddCumSum",
    "PADV2": "AddPadV2",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
}


def resolver_method(op_name):
    """The `MicroMutableOpResolver` method that registers a TFLite builtin operator, e.g.
    CONV_2D -> AddConv2D, DEPTHWISE_CONV_2D -> AddDepthwiseConv2D, PADV2 -> AddPadV2."""
    if op_name in _IRREGULAR_METHODS:
        return _IRREGULAR_METHODS[op_name]
    parts = op_name.split("_")
    return "Add" + "".join(p if p[:1].isdigit() else p.capitalize() for p in parts)


def tflm_missing(op_names):
    """The operators of `op_names` that TensorFlow Lite Micro has no kernel for, sorted."""
    return sorted({name for name in op_names if name not in TFLM_BUILTIN_OPS})


def c_sources(content, op_names, source_name):
    """(header text, source text) of the model bytes `content` using `op_names`."""
    methods = sorted({resolver_method(name) for name in op_names})
    registered = " \\\n".join(f"  (resolver).{method}();" for method in methods)
    missing = tflm_missing(op_names)
    if missing:
        missing = [f"// No TensorFlow Lite Micro kernel (device_report.md): {', '.join(missing)}."]
    header = "\n".join(
        [
            f"// The int8 TFLite model {source_name} ({len(content)} bytes), written by",
            "// pibconv_tf (apps.export --formats=tflite_int8_c).",
            f"// Operators ({len(methods)}): {', '.join(sorted(set(op_names)))}.",
            *missing,
            "#ifndef PIBCONV_MODEL_DATA_H_",
            "#define PIBCONV_MODEL_DATA_H_",
            "",
            f"extern const unsigned char {SYMBOL}[];",
            f"extern const unsigned int {SYMBOL}_len;",
            "",
            "// tflite::MicroMutableOpResolver<kModelOperatorCount> resolver;",
            "// PIBCONV_ADD_MODEL_OPERATORS(resolver);",
            f"constexpr int kModelOperatorCount = {len(methods)};",
            "#define PIBCONV_ADD_MODEL_OPERATORS(resolver) \\",
            "  do { \\",
            registered + " \\",
            "  } while (0)",
            "",
            "#endif  // PIBCONV_MODEL_DATA_H_",
            "",
        ]
    )
    lines = [
        ", ".join(f"0x{byte:02x}" for byte in content[start : start + _BYTES_PER_LINE])
        for start in range(0, len(content), _BYTES_PER_LINE)
    ]
    source = "\n".join(
        [
            f'#include "{HEADER}"',
            "",
            "// Aligned for TensorFlow Lite Micro, which reads the flatbuffer in place.",
            f"alignas(16) const unsigned char {SYMBOL}[] = {{",
            *(f"  {line}," for line in lines),
            "};",
            f"const unsigned int {SYMBOL}_len = {len(content)};",
            "",
        ]
    )
    return header, source


def write_c_array(content, op_names, directory, source_name):
    """Writes `model_data.h` and `model_data.cc` into `directory`; returns their metadata."""
    directory = pathlib.Path(directory)
    header, source = c_sources(content, op_names, source_name)
    files.write_text_atomic(directory / HEADER, header)
    files.write_text_atomic(directory / SOURCE, source)
    return {
        "path": SOURCE,
        "header": HEADER,
        "of": source_name,
        "bytes": len(content),
        "operators": sorted(set(op_names)),
        "resolver": sorted({resolver_method(name) for name in op_names}),
    }
