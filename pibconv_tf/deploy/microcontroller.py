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

C_ARRAY = "tflite_int8_c"
SOURCE = "model_data.cc"
HEADER = "model_data.h"
SYMBOL = "g_model_data"
_BYTES_PER_LINE = 12


def resolver_method(op_name):
    """The `MicroMutableOpResolver` method that registers a TFLite builtin operator, e.g.
    CONV_2D -> AddConv2D, DEPTHWISE_CONV_2D -> AddDepthwiseConv2D, MEAN -> AddMean."""
    parts = op_name.split("_")
    return "Add" + "".join(p if p[:1].isdigit() else p.capitalize() for p in parts)


def c_sources(content, op_names, source_name):
    """(header text, source text) of the model bytes `content` using `op_names`."""
    methods = sorted({resolver_method(name) for name in op_names})
    registered = " \\\n".join(f"  (resolver).{method}();" for method in methods)
    header = "\n".join(
        [
            f"// The int8 TFLite model {source_name} ({len(content)} bytes), written by",
            "// pibconv_tf (apps.export --formats=tflite_int8_c).",
            f"// Operators ({len(methods)}): {', '.join(sorted(set(op_names)))}.",
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
    (directory / HEADER).write_text(header)
    (directory / SOURCE).write_text(source)
    return {
        "path": SOURCE,
        "header": HEADER,
        "of": source_name,
        "bytes": len(content),
        "operators": sorted(set(op_names)),
        "resolver": sorted({resolver_method(name) for name in op_names}),
    }
