"""``onnxopt finetune``: recover accuracy after lite/prune/qdq, or quantization-aware training, in torch.

torch is optional: this module imports without it, and the command says how to install it.
"""
from __future__ import annotations

import dataclasses
import json

import click
from onnx import TensorProto

from .. import model_io
from ..data import open_data
from ..errors import OptionError, require
from ..input_dims import real_inputs
from ..qat import prepare_qat
from . import cli
from .options import image_options, image_settings, input_shape_option, open_cli_data, parse_input_shapes


@cli.command("finetune", epilog="""\b
Examples:
  onnxopt finetune pruned.onnx -o pruned.ft.onnx --data train/ --teacher model.onnx --epochs 5
  onnxopt finetune model.int8.onnx -o model.int8.ft.onnx --data train.npz --teacher model.onnx
  onnxopt finetune model.onnx -o model.w4a4.onnx --qat w4a4 --data train.npz --epochs 10
  torchrun --nproc_per_node=2 -m onnxopt finetune pruned.onnx -o out.onnx --data train.npz --teacher model.onnx
""")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the finetuned model (written atomically).")
@click.option("--data", required=True, metavar="PATH", help="Training data: .npy, .npz, image folder (labels from labels.json or class subfolders), or file.py:function yielding feed dicts, arrays or (inputs, labels) pairs.")
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="The original model (before lite/prune/qdq) to distill from (label-free). Default with --qat: MODEL itself.")
@click.option("--labels", default=None, metavar="PATH", help="Integer labels (.npy) for supervised loss; labels inside the data are used when present.")
@click.option("--no-labels", is_flag=True, help="Ignore labels found in the data (pure distillation).")
@click.option("--loss", "user_loss", default=None, metavar="FILE.py:FN", help="Extra user loss fn(student_outputs, teacher_outputs, labels, batch) -> scalar.")
@click.option("--epochs", type=int, default=None,
              help="Default: about 10,000 samples seen, at most 15 epochs (early stopping on the held-in split may end sooner).")
@click.option("--lr", type=float, default=None,
              help="Learning rate (linear warm-up, then cosine decay to 0). Default: 1e-3 for a pruned student (fewer parameters "
                   "than --teacher), 1e-4 otherwise, times sqrt(batch/32) (x10 with --optimizer sgd).")
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Fraction of the steps with a linear learning-rate warm-up.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--augment/--no-augment", default=None,
              help="Random translation + horizontal flip of image inputs. Default: on for label-free distillation of images "
                   "(the teacher sees the same augmented image), off with labels.")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="Distillation temperature for classifier logits.")
@click.option("--feature-loss", default=None, metavar="T1,T2|auto|none",
              help="Also match these intermediate tensors to the teacher's (MSE); 'auto': every activation output and "
                   "residual sum the two models share (after lite: the ReLU outputs against the original's ReLU6 outputs). "
                   "Default: auto with --teacher (none with --qat); 'none' turns it off.")
@click.option("--feature-weight", type=float, default=1.0, show_default=True, help="Weight of each --feature-loss term.")
@click.option("--qat", default=None, metavar="wXaY", help="Quantization-aware training of a float model: e.g. w4a4, w8a8, wta8 (ternary), wba8 (binary).")
@click.option("--target", default="tensorrt", show_default=True, help="With --qat: the qdq target (tensorrt, ort, tidl, tidl-tda4vm).")
@click.option("--per-tensor", is_flag=True, help="With --qat: per-tensor weight scales (default per channel).")
@click.option("--symmetric", type=click.Choice(["auto", "true", "false"]), default="auto", show_default=True, help="With --qat: activation symmetry.")
@click.option("--low-bit", type=click.Choice(["restricted", "int4"]), default="restricted", show_default=True,
              help="With --qat: <8-bit weights in a restricted int8 range or INT4 (opset >= 21).")
@click.option("--quant-mode", type=click.Choice(["lsq", "pact", "fixed"]), default="lsq", show_default=True,
              help="How Q/DQ scales learn: LSQ step size, PACT clipping, or fixed.")
@click.option("--bn-mode", type=click.Choice(["auto", "frozen", "train"]), default="auto", show_default=True,
              help="BatchNormalization while training: batch statistics (train), running statistics (frozen); auto = frozen (measured best after pruning).")
@click.option("--bn-recalib", is_flag=True, help="Re-estimate BatchNormalization statistics on the data after training.")
@click.option("--val-split", type=float, default=None,
              help="Fraction of --data held in (not trained on) for early stopping; the epoch with the lowest held-in loss is "
                   "kept. Default: 0.03 from 500 samples up, else 0. Never give the evaluation data as --data.")
@click.option("--patience", type=int, default=3, show_default=True, help="Stop after this many epochs without a lower held-in loss (0: never).")
@click.option("--checkpoint", type=click.Path(file_okay=False), default=None, help="Write a resumable checkpoint here every epoch.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--teacher-runtime", type=click.Choice(["torch", "ort"]), default="torch", show_default=True)
@click.option("--max-samples", type=int, default=None, help="Use at most this many samples of --data.")
@click.option("--every", type=int, default=1, help="Take every n-th sample of --data ...")
@click.option("--offset", type=int, default=0, help="... starting at this one.")
@click.option("--exclude-every", is_flag=True, help="Take the complement of the --every/--offset selection (e.g. hold out every 5th).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="torch intra-op threads (0 = the cores the load average leaves idle).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write a JSON report (history, parity, throughput).")
@image_options
@input_shape_option
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def finetune_cmd(model, output, data, teacher, labels, no_labels, user_loss, epochs, lr, warmup, batch_size, optimizer, weight_decay, augment,
                 temperature, feature_loss, feature_weight, qat, target, per_tensor, symmetric, low_bit, quant_mode, bn_mode, bn_recalib, val_split, patience,
                 checkpoint, resume, device, teacher_runtime, max_samples, every, offset, exclude_every, seed, threads, report_path, input_shapes, quiet, **kwargs):
    """Finetune MODEL in torch and write the learned weights and Q/DQ scales back into its graph.

    By default label-free distillation from --teacher (KL on classifier logits, L2 otherwise;
    an output written by a final Softmax/Sigmoid/ArgMax is trained on the logits before it, a
    Sigmoid's labels each by their Bernoulli KL, a segmentation map's positions each by the KL
    over their classes); with labels (a class per sample, or per pixel
    of a segmentation map) or --loss, supervised as well. With --qat wXaY a float MODEL is
    quantized by the qdq pass and trained with fake quantization (STE; learnable scales). The written model's
    onnxruntime output is checked against the trained torch module.
    """
    require("torch", "onnxopt finetune", "pip install torch")
    from ..torch.train import FinetuneConfig, dist_info, finetune, recovery_defaults

    image = image_settings(kwargs)
    shapes = parse_input_shapes(input_shapes)
    rank = dist_info()[0]
    log = (lambda msg: None) if quiet or rank != 0 else (lambda msg: click.echo(msg, err=True))
    model_io.refuse_overwriting_inputs(output, [model] + ([teacher] if teacher else []))
    source = model_io.load_model(model)
    teacher_model = model_io.load_model(teacher) if teacher else None
    ds = open_cli_data(data, image, source, shapes, recorded_from=[teacher_model], log=log, batch_size=batch_size,
                       max_samples=max_samples, labels=labels, every=every, offset=offset, exclude_every=exclude_every)
    if ds.kind == "random":
        click.echo(f"WARNING: finetuning on RANDOM data (--data random, {ds.count()} samples): a smoke test only; "
                   "the learned weights are meaningless. Give real training data.", err=True)
    if no_labels:
        ds.labels = lambda: None
    # what the user did not give is chosen from the data size and the model (recovery_defaults says why)
    has_labels = labels is not None or (hasattr(ds, "labels") and ds.labels() is not None) or user_loss is not None
    if getattr(ds, "labels_origin", None) == "class subfolders":
        log(f"labels: the class subfolders of {data}, numbered in sorted folder order as torchvision's ImageFolder "
            "does (--labels FILE gives others, --no-labels distills only)")
    chosen = recovery_defaults(source, teacher_model if not qat else (teacher_model or source), ds.count(), batch_size,
                               labels=has_labels, qat=bool(qat), optimizer=optimizer, image_input=_image_input(source))
    given = {"lr": lr, "epochs": epochs, "augment": augment, "val_split": val_split,
             "feature_loss": None if feature_loss is None else [f for f in feature_loss.split(",") if f and f != "none"]}
    said = [f"{k} {_show(chosen[k][0])} ({chosen[k][1]})" for k in given if given[k] is None]
    if said:
        log("finetune defaults: " + "; ".join(said))
    settings = {k: chosen[k][0] if v is None else v for k, v in given.items()}
    epochs, lr = settings["epochs"], settings["lr"]
    cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, augment=settings["augment"],
                         warmup=warmup, val_split=settings["val_split"], patience=patience,
                         temperature=temperature, feature_loss=settings["feature_loss"], feature_weight=feature_weight,
                         user_loss=user_loss, quant_mode=quant_mode, bn_mode=bn_mode, bn_recalib=bn_recalib, checkpoint=checkpoint,
                         resume=resume, device=device, seed=seed, progress=not quiet and rank == 0,
                         teacher_runtime=teacher_runtime, log=log, threads=threads)
    student = source
    if qat:
        calib = open_data(dataclasses.replace(ds.spec, max_samples=min(max_samples or 256, 256), labels=None), source, shapes)
        student, overrides, _ = prepare_qat(source, qat, calib, target=target, per_channel=not per_tensor,
                                                    symmetric=symmetric, low_bit=low_bit, log=log)
        cfg.weight_modes, cfg.float_weights = overrides["weight_modes"], overrides["float_weights"]
        if teacher_model is None:
            teacher_model = source
    elif per_tensor or low_bit != "restricted":
        raise OptionError("--per-tensor/--low-bit only apply with --qat.", "add --qat wXaY or drop them")
    result = finetune(student, ds, teacher=teacher_model, config=cfg)
    model_io.record_metadata(result.model, "onnxopt.finetune", {"epochs": epochs, "lr": lr, "qat": qat, "teacher": bool(teacher_model),
                                                               "quant_mode": quant_mode, "parity_max_abs": result.parity.get("max_abs")})
    if rank == 0:
        model_io.save_model(result.model, output, inputs=[model] + ([teacher] if teacher else []))
        if result.parity:
            log(f"parity onnxruntime vs torch: max|diff| {result.parity['max_abs']:.2e} (outputs up to {result.parity['max_ref']:.3g})")
        log(f"{result.samples_per_second:.1f} samples/s; wrote {output}")
        if report_path:
            model_io.write_text_atomic(report_path, json.dumps({"history": result.history, "parity": result.parity,
                                                                "samples_per_second": result.samples_per_second,
                                                                "qat": qat}, indent=2))


def _image_input(model) -> bool:
    """Whether the model's first input is a float NCHW image (augmentation shifts and flips H, W)."""
    for vi in real_inputs(model):
        t = vi.type.tensor_type
        return t.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(t.shape.dim) == 4
    return False


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(value) if value else "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)
