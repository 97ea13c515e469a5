"""`cnnlab import` (Keras files -> model file) and `cnnlab export` (model -> .keras / ONNX).

Both commands live here; `add_parser` adds whichever of them is not there yet, so the
registry can name this module once per command.
"""
from __future__ import annotations

from pathlib import Path

IMPORT_EPILOG = """examples:
  cnnlab import model.keras                        # -> model.safetensors beside it
  cnnlab import model.h5 -o runs/keras/model.safetensors --classes cat,dog
  cnnlab import model.json --weights model.h5      # to_json() + save_weights()

Reads Keras 3 .keras files, legacy .h5 (Keras 2 / tf.keras) and JSON + weights .h5 with
h5py (no Keras or TensorFlow needed); nothing in the file is executed. A first
Rescaling layer becomes the model's input preprocessing. 'cnnlab serve model.keras'
and the other commands also read Keras files directly."""

EXPORT_EPILOG = """examples:
  cnnlab export runs/demo --format onnx -o demo.onnx
  cnnlab export runs/demo --format onnx --layout NCHW -o demo_nchw.onnx
  cnnlab export runs/demo --format keras -o demo.keras

ONNX: opset 17, input 'pixels' float32 (batch, H, W, C) with raw pixel values 0..255
(the preprocessing is inside the graph), output 'probabilities' (batch, classes);
class names and preprocessing are in the metadata. Keras: a Keras 3 .keras file
whose first layer (Rescaling) applies the same preprocessing to raw pixels."""


def add_parser(sub, fmt):
    if "import" not in sub.choices:
        p = sub.add_parser("import", help="convert a Keras model (.keras, .h5, .json + .h5) "
                                          "to a cnnlab model file", epilog=IMPORT_EPILOG,
                           formatter_class=fmt)
        p.add_argument("file", help="a .keras, .h5 or .json Keras model file")
        p.add_argument("-o", "--out", help="output model file (default: beside the input, "
                                           "with .safetensors)")
        p.add_argument("--weights", help="the weights .h5 for a .json architecture")
        p.add_argument("--classes", help="class names, comma separated (default: those in "
                                         "the file, else 0..N-1)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    if "export" not in sub.choices:
        p = sub.add_parser("export", help="write a model as ONNX or Keras (.keras)",
                           epilog=EXPORT_EPILOG, formatter_class=fmt)
        p.add_argument("model", help="model file, run directory, zoo name or .json")
        p.add_argument("--format", choices=["onnx", "keras"], required=True)
        p.add_argument("-o", "--out", help="output file (default: <model>.onnx / .keras here)")
        p.add_argument("--layout", choices=["NHWC", "NCHW"], default="NHWC",
                       help="ONNX input layout (default NHWC, as cnnlab takes images)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _check_out(out: Path, overwrite: bool, *inputs):
    if any(out.resolve() == Path(i).resolve() for i in inputs if i):
        raise ValueError(f"{out}: the output would replace the input")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or choose -o")


def run(args) -> int:
    return run_import(args) if args.command == "import" else run_export(args)


def run_import(args) -> int:
    from ..api import Sequential
    from .keras_import import import_keras
    src = Path(args.file)
    classes = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
        if not all(classes):
            raise ValueError(f"--classes has an empty name: {args.classes!r}")
    out = Path(args.out) if args.out else src.with_suffix(".safetensors")
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output is a cnnlab model file; name it *.safetensors")
    _check_out(out, args.overwrite, src, args.weights)
    model, notes = import_keras(src, weights=args.weights, classes=classes)
    model = model.copy(Sequential)
    for note in notes:
        print(f"note: {note}")
    model.summary()
    model.save(out)
    print(f"Saved {out}\n"
          f"Next: cnnlab report {out} --data DATASET\n"
          f"      cnnlab serve {out}\n"
          f"      cnnlab export {out} --format onnx")
    return 0


def run_export(args) -> int:
    from ..zoo import load_any
    model = load_any(args.model)
    ext = ".onnx" if args.format == "onnx" else ".keras"
    stem = Path(args.model).stem if Path(args.model).stem != "model" else \
        Path(args.model).resolve().parent.name
    out = Path(args.out) if args.out else Path(stem + ext)
    if out.suffix != ext:
        kind = "an ONNX" if args.format == "onnx" else "a Keras"
        raise ValueError(f"{out}: {kind} file is named *{ext}")
    _check_out(out, args.overwrite, args.model)
    if args.format == "onnx":
        from .onnx_export import OPSET, export_onnx
        export_onnx(model, out, layout=args.layout)
        shape = model.input_shape
        dims = (["batch", *shape] if args.layout == "NHWC" or len(shape) != 3
                else ["batch", shape[2], shape[0], shape[1]])
        print(f"Saved {out} (ONNX opset {OPSET}, checked with onnx.checker)\n"
              f"  input  'pixels' float32 {tuple(dims)}: raw pixel values 0..255, "
              "preprocessing inside the graph\n"
              f"  output 'probabilities' float32 (batch, {model.num_classes})")
    else:
        from .keras_export import export_keras
        export_keras(model, out)
        print(f"Saved {out} (Keras 3; input: raw pixel values 0..255, its first layer "
              "applies the preprocessing)\n"
              f"  import keras; keras.saving.load_model('{out}').predict(images)")
    return 0
