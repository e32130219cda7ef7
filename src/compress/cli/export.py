"""``compress export``: PyTorch -> ONNX with a parity check and a block map."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from compress.blocks import block_rows
from compress.cli import command
from compress.cli._common import block_map_path, print_json
from compress.config import add_arguments, from_args
from compress.errors import ConfigError
from compress.export.config import ExportConfig
from compress.log import logger
from compress.onnx_io import save_model, write_json
from compress.outputs import Outputs
from compress.reports import fmt, text_table


def export_report_path(out: str | Path) -> Path:
    """``OUT.export.json`` beside ``OUT.onnx``."""
    p = Path(out)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".export.json")


@command(
    "export",
    help="export a PyTorch model to ONNX, check it against torch, and write its block map",
    description=(
        "Export a PyTorch model to ONNX (dynamo exporter by default), check it with onnx.checker,\n"
        "run it in ONNX Runtime (CPU) on the example inputs and compare every output with torch\n"
        "(a mismatch is an error and nothing is written), then find its repeated blocks.\n\n"
        "Writes OUT.onnx (tensor data in OUT.onnx.data when the model is too large for one file),\n"
        "OUT.blocks.json (the block map) and OUT.export.json (versions, inputs, dynamic axes,\n"
        "parity numbers, timings). The artifacts hold no absolute paths of this machine.\n"
        "With --calib, each block's GradNorm (SGLP's block importance: the norm of the loss gradient\n"
        "over the block's parameters, in torch) is computed on those batches and stored in the block\n"
        "map, for 'compress prune --metric gradnorm [--per-segment]'.\n\n"
        "MODEL is one of:\n"
        "  package.module:callable   a callable returning an nn.Module, or (module, example_inputs)\n"
        "                            with example_inputs a tuple of tensors or a dict name -> tensor\n"
        "  path/to/file.py:callable  the same, from a Python file\n"
        "  hf:PATH                   a local Hugging Face folder, loaded offline: causal LMs\n"
        "                            (*ForCausalLM) export logits without a cache, others\n"
        "                            transformers.AutoModel; inputs input_ids, attention_mask\n"
        "                            [, token_type_ids], dynamic batch and sequence\n"
        "  diffusers:PATH            a folder saved by a diffusers model (config.json with\n"
        "                            _class_name), called with return_dict=False; example inputs\n"
        "                            from its config (hidden_states with in_channels x sample_size\n"
        "                            <= 32, 8 text tokens of the text dim, timestep, ...), static\n"
        "                            shapes; --input replaces them\n"
        "  FILE.pt2                  a program saved with torch.export.save; archives with pickled\n"
        "                            payloads need --trust-code (unpickling runs code)\n\n"
        "examples:\n"
        "  compress export net.py:build -o net.onnx --input x:1x3x224x224 --dynamic x:0=batch\n"
        "  compress export torchvision.models:resnet18 -o r18.onnx --input x:1x3x224x224 --blocks layer1,layer2,layer3,layer4\n"
        "  compress export hf:./all-MiniLM-L6-v2 -o minilm.onnx\n"
        "  compress export diffusers:./sd3-transformer -o sd3.onnx\n"
        "  compress export model.pt2 -o model.onnx --opset 20\n"
        "  compress export net.py:build -o net.onnx --calib calib/   # + GradNorm in net.blocks.json"
    ),
)
class Export:
    """``compress export``: its flags and its run (load, export with the parity check, write the artifacts)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add MODEL, -o, --weights, the input/dynamic/exporter/opset/blocks flags, the tolerances, --force, --trust-code and --json."""
        parser.add_argument("model", metavar="MODEL",
                            help="package.module:callable, path/to/file.py:callable, hf:PATH, diffusers:PATH or FILE.pt2 "
                                 "(see above)")
        parser.add_argument("-o", "--output", metavar="OUT.onnx", required=True,
                            help="the ONNX file to write; OUT.blocks.json and OUT.export.json go beside it "
                                 "(e.g. -o out/net.onnx; the folder must exist)")
        parser.add_argument("--weights", metavar="FILE",
                            help="load this state dict into the module (torch.load(weights_only=True), strict) "
                                 "before exporting (e.g. --weights best.pt)")
        parser.add_argument("--input", metavar="NAME:SHAPE[:DTYPE]", action="append", default=None,
                            help="an example input, repeatable; replaces the inputs MODEL provides. Floats are "
                                 "seeded random, '*mask' ints ones, '*ids' ints in [0, 100), other ints zeros "
                                 "(e.g. --input x:1x3x224x224:float32 --input input_ids:1x128:int64; DTYPE "
                                 "defaults to float32)")
        parser.add_argument("--dynamic", metavar="NAME:AXIS[=LABEL]", action="append", default=None,
                            help="make an input axis dynamic, repeatable; axes with the same LABEL have the "
                                 "same size (e.g. --dynamic x:0=batch; LABEL defaults to NAME_dimAXIS; "
                                 "hf: models default to batch and sequence)")
        add_arguments(ExportConfig, parser, only=("exporter", "opset", "blocks", "atol", "rtol", "min_cosine"))
        parser.add_argument("--force", action="store_true",
                            help="overwrite OUT.onnx and its .blocks.json/.export.json if they exist")
        parser.add_argument("--trust-code", action="store_true",
                            help="allow a FILE.pt2 whose payloads are pickles (custom objects, pickled weights or "
                                 "example inputs that torch.load(weights_only=True) refuses): unpickling runs code, "
                                 "so pass it only for archives you made or trust. Without it such an archive is "
                                 "refused and nothing in it is unpickled. (file.py:callable and module:callable are "
                                 "code by nature and always run.)")
        parser.add_argument("--json", action="store_true",
                            help="print a machine-readable summary (JSON) instead of the block table")
        g = parser.add_argument_group("GradNorm (SGLP block importance, stored in the block map)")
        g.add_argument("--calib", metavar="PATH",
                       help="calibration data (a folder of .npz files or one .npz; keys = the exported model's input "
                            "names) on which each block's GradNorm is computed in torch and stored in OUT.blocks.json "
                            "for 'compress prune --metric gradnorm' (e.g. --calib calib/)")
        g.add_argument("--batch-size", type=int, metavar="N",
                       help="with --calib: split each .npz file into batches of N samples (e.g. --batch-size 8)")
        g.add_argument("--gradnorm", action=argparse.BooleanOptionalAction, default=None,
                       help="compute GradNorm on the --calib batches (the default when --calib is given); "
                            "--no-gradnorm skips it")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Export MODEL and write OUT.onnx, OUT.blocks.json and OUT.export.json; returns the exit code (0).

        Every flag and output path is checked before the model is loaded; user errors raise
        ``CompressError`` and nothing is written then.
        """
        from compress.export import (
            DynamicAxis,
            InputSpec,
            export,
            load_torch_model,
            make_example_inputs,
            model_files,
        )

        # Everything that can be checked without work is checked first.
        specs = [InputSpec.parse(s) for s in args.input or ()]
        dynamic = tuple(DynamicAxis.parse(s) for s in args.dynamic or ())
        config = from_args(ExportConfig, args, dynamic=dynamic, verbose=args.verbose > 0)
        gradnorm = _gradnorm_wanted(args)
        outs = Outputs(inputs=[*model_files(args.model), *([args.weights] if args.weights else []),
                               *([args.calib] if args.calib else [])], force=args.force)
        out = outs.file(args.output, model=True)
        blocks_path = outs.file(block_map_path(out))
        report_path = outs.file(export_report_path(out))
        outs.check()

        logger.info("loading %s...", args.model)
        start = time.perf_counter()
        loaded = load_torch_model(args.model, weights=args.weights, verbose=config.verbose, trust_code=args.trust_code)
        load_s = time.perf_counter() - start
        if specs:
            example: Any = make_example_inputs(specs)
        elif loaded.example_inputs is not None:
            example = loaded.example_inputs
        else:
            raise ConfigError(f"MODEL {args.model} provides no example inputs and no --input was given",
                              hint="pass --input NAME:SHAPE[:DTYPE] (e.g. --input x:1x3x224x224), or return "
                                   "(module, example_inputs) from the callable")
        if not dynamic and loaded.dynamic:
            names = set(example) if isinstance(example, dict) else set()
            config = replace(config, dynamic=tuple(d for d in loaded.dynamic if d.name in names))

        exported, report = export(loaded.module, config, data=example)
        model, block_map = exported.proto, exported.block_map
        gradnorm_summary = None
        if gradnorm and block_map.blocks:
            block_map, gradnorm_summary = _add_gradnorm(args, loaded.module, model, block_map)
        elif gradnorm:
            logger.warning("warning: no blocks were found, so no GradNorm was computed")

        context = {"model": loaded.name, "onnx": out.name, "exporter": report.exporter, "opset": report.opset,
                   "inputs": [i.to_dict() for i in report.inputs],
                   "dynamic_axes": [d.to_dict() for d in report.dynamic]}
        with outs.writing() as stage:
            files = save_model(model, stage.path(out))
            write_json(stage.path(blocks_path), {**block_map.to_dict(), "export": context})
            summary = {
                **report.to_dict(), "model": loaded.name, "model_kind": loaded.kind,
                "weights": Path(args.weights).name if args.weights else None,
                "files": [f.name for f in (*files, blocks_path, report_path)],
                "blocks": {"containers": list(block_map.containers), "source": block_map.source,
                           "count": len(block_map.blocks), "removable": len(block_map.removable)},
                "gradnorm": gradnorm_summary,
            }
            summary["timings"]["load_s"] = round(load_s, 3)
            write_json(stage.path(report_path), summary)

        if args.json:
            print_json(summary)
            return 0
        if block_map.blocks:
            headers, rows = block_rows(block_map)
            print(text_table(headers, rows))
            print()
        worst = max(report.parity, key=lambda p: p.max_abs_error)
        where = ", ".join(block_map.containers) or "no container"
        print(f"wrote {out.name}: {report.nodes} nodes, {fmt(report.params)} params, {len(block_map.blocks)} blocks "
              f"in {where} ({len(block_map.removable)} removable); parity max abs error {worst.max_abs_error:.2g}, "
              f"cosine {min(p.cosine for p in report.parity):.6f}; export {report.export_s:.1f} s")
        if gradnorm_summary is not None:
            low = min(gradnorm_summary["values"], key=gradnorm_summary["values"].get)
            print(f"GradNorm of {len(block_map.blocks)} blocks in {blocks_path.name} ({gradnorm_summary['loss']}; "
                  f"{gradnorm_summary['batches']} batches): lowest {low} ({gradnorm_summary['values'][low]:.3g})")
        return 0


def _gradnorm_wanted(args: argparse.Namespace) -> bool:
    """Whether to compute GradNorm: with --calib unless --no-gradnorm; ConfigError for --gradnorm without --calib."""
    from compress.errors import CalibrationError

    if args.gradnorm and not args.calib:
        raise ConfigError("--gradnorm needs calibration data", hint="pass --calib DIR (a folder of .npz batches "
                          "keyed by the model's input names), or drop --gradnorm")
    if args.batch_size is not None and not args.calib:
        raise ConfigError("--batch-size splits the --calib data, but no --calib was given", hint="pass --calib DIR")
    if args.calib and not Path(args.calib).exists():
        raise CalibrationError(f"calibration data not found: {args.calib}",
                               hint="pass a folder of .npz files or one .npz (make one with 'compress calib')")
    return bool(args.calib) and args.gradnorm is not False


def _add_gradnorm(args: argparse.Namespace, module: Any, model: Any, block_map: Any) -> tuple[Any, dict[str, Any]]:
    """The block map with each block's GradNorm on the --calib batches, and the report's ``gradnorm`` entry."""
    from compress.cli._common import load_calib_for
    from compress.export.gradnorm import block_map_with_gradnorms

    calib = load_calib_for(argparse.Namespace(calib=args.calib, batch_size=args.batch_size, random_calib=None,
                                              random_dims=None), model)
    logger.info("computing GradNorm of %d blocks on %s...", len(block_map.blocks), calib.description)
    block_map, result = block_map_with_gradnorms(module, model, block_map, calib)
    return block_map, {"calibration": calib.description, **result.to_dict()}
