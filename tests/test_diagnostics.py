"""One test per diagnostic: the error's line, column and message, and its rendering."""
from helpers import BASE, err, where


def test_rendering_has_location_source_line_and_caret():
    text = BASE.replace("heads=2", "heads=3")
    e = err(text)
    line, col = where(text, "heads=3")
    lines = str(e).splitlines()
    assert lines[0] == f"spec.vit:{line}:{col}: error: dim 64 is not divisible by heads 3"
    assert lines[1].strip() == "transformer heads=3 qkv_bias"
    caret = lines[2]
    assert caret.index("^") - 4 == col - 1  # four spaces of indent before the source line
    assert (e.filename, e.line, e.column) == ("spec.vit", line, col)


def test_syntax_error():
    text = BASE.replace("classes=10", "classes=")
    e = err(text)
    line, col = where(text, "\n}")
    assert (e.line, e.column) == (line, len("  head pool=cls classes=") + 1)
    assert e.message.startswith("unexpected end of line; expected one of")
    assert "__ANON" not in str(e) and "$END" not in str(e) and "_NL" not in str(e)


def test_syntax_error_unclosed_brace_names_end_of_file():
    text = BASE.rstrip().rstrip("}")
    e = err(text)
    assert "unexpected end of file" in e.message and "'}'" in e.message
    assert "$END" not in str(e)


def test_unexpected_character():
    text = BASE.replace("dim=64", "dim=6$4")
    e = err(text)
    assert (e.line, e.column) == where(text, "$")
    assert e.message.startswith("unexpected character '$'")


def test_unknown_op_did_you_mean():
    text = BASE.replace("transformer heads", "transfomer heads")
    e = err(text)
    assert (e.line, e.column) == where(text, "transfomer")
    assert e.message == "unknown op 'transfomer' (did you mean 'transformer'?)"


def test_unknown_attribute_did_you_mean():
    text = BASE.replace("heads=2", "haeds=2")
    e = err(text)
    assert (e.line, e.column) == where(text, "haeds")
    assert e.message == "unknown attribute 'haeds' for transformer (did you mean 'heads'?)"


def test_unknown_flag_did_you_mean():
    text = BASE.replace("qkv_bias", "qkv_bais")
    e = err(text)
    assert (e.line, e.column) == where(text, "qkv_bais")
    assert e.message == "unknown attribute 'qkv_bais' for transformer (did you mean 'qkv_bias'?)"


def test_wrong_type():
    text = BASE.replace("heads=2", "heads=two")
    e = err(text)
    assert (e.line, e.column) == where(text, "heads=two")
    assert e.message.startswith("invalid value two for 'heads' of transformer:")
    assert "integer" in e.message


def test_out_of_range_value():
    text = BASE.replace("classes=10", "classes=0")
    e = err(text)
    assert (e.line, e.column) == where(text, "classes=0")
    assert e.message == "invalid value 0 for 'classes' of head: input should be greater than or equal to 1"


def test_bad_enum_word():
    text = BASE.replace("pool=cls", "pool=max")
    e = err(text)
    assert (e.line, e.column) == where(text, "pool=max")
    assert "'cls' or 'mean'" in e.message


def test_dim_not_divisible_by_heads():
    text = BASE.replace("heads=2", "heads=5")
    e = err(text)
    assert (e.line, e.column) == where(text, "heads=5")
    assert e.message == "dim 64 is not divisible by heads 5"


def test_image_not_divisible_by_patch():
    text = BASE.replace("size=8", "size=5")
    e = err(text)
    assert (e.line, e.column) == where(text, "size=5")
    assert e.message == "image size 32x32 is not divisible by the patch size 5"


def test_unknown_name_in_reference():
    text = BASE.replace("  norm layernorm eps=1e-6", "  norm layernorm eps=1e-6 from=blocks.11")
    e = err(text)
    assert (e.line, e.column) == where(text, "from=blocks.11")
    assert e.message == "unknown name 'blocks.11' in from=blocks.11 (did you mean 'blocks.1'?)"


def test_unknown_template_in_extends():
    text = "template vit {\n  input image 3x8x8\n}\nmodel m extends vti {\n}\n"
    e = err(text)
    assert (e.line, e.column) == where(text, "vti")
    assert e.message == "unknown model or template 'vti' (did you mean 'vit'?)"


def test_duplicate_name():
    text = BASE.replace("  head pool", "  norm layernorm\n  head pool")
    e = err(text)
    assert (e.line, e.column) == where(text, "norm layernorm", 1)
    assert e.message.startswith("duplicate name 'norm'")


def test_duplicate_stage_name():
    text = BASE.replace("  norm layernorm eps=1e-6", "  stage blocks {\n    transformer heads=2\n  }\n  norm layernorm eps=1e-6")
    e = err(text)
    assert (e.line, e.column) == where(text, "stage blocks", 1)
    assert e.message == "duplicate name 'blocks'"


def test_cycle():
    text = BASE.replace("  norm layernorm eps=1e-6\n", "  a: add from=(blocks, b)\n  b: norm layernorm eps=1e-6\n")
    e = err(text)
    assert (e.line, e.column) == where(text, "from=(blocks, b)")
    assert e.message == "cycle in data flow: a -> b -> a"


def test_shape_mismatch_where_paths_join():
    text = BASE.replace("  norm layernorm eps=1e-6\n", "  norm layernorm eps=1e-6\n  j: add from=(patch_embed, norm)\n")
    e = err(text)
    assert (e.line, e.column) == where(text, "from=(patch_embed, norm)")
    assert e.message == "shape mismatch where paths join: 'patch_embed' gives tokens 16x64, 'norm' gives tokens 17x64"


def test_unused_output():
    text = BASE.replace("  head pool", "  extra: norm layernorm from=tokens\n  head pool")
    text = text.replace("  head pool=cls", "  head pool=cls from=norm")
    e = err(text)
    assert (e.line, e.column) == where(text, "extra:")
    assert e.message == "the output of 'extra' is never used; the model's output is 'head'"


def test_transformer_dim_disagrees_with_input():
    text = BASE.replace("transformer heads=2", "transformer dim=128 heads=2")
    e = err(text)
    assert (e.line, e.column) == where(text, "dim=128")
    assert e.message == "dim=128 but the input has 64 channels"


def test_undefined_variable_in_arithmetic():
    text = BASE.replace("dim=64", "dim=width*2")
    e = err(text)
    assert (e.line, e.column) == where(text, "width")
    assert e.message == "'*' needs numbers, got 'width' (is it an undefined variable?)"


def test_two_models_in_one_file():
    text = BASE + BASE.replace("model m", "model n")
    e = err(text)
    assert (e.line, e.column) == where(text, "model n")
    assert "keep one 'model'" in e.message
