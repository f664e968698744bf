"""Liveness peak memory on hand-built ONNX graphs, checked against bytes counted by hand."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from redistill import memory as M
from redistill.cli import main
from redistill.errors import UserError
from train.design import analyze_model

F32, F16, I8 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def weight(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def make(nodes, inputs, outputs, inits=(), opset=13, check=True):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if check:
        onnx.checker.check_model(model)
    return model


def live(report):
    return [r.live_bytes for r in report.nodes]


# --- graphs ---------------------------------------------------------------------------------------


def chain(batch_dim=1):
    """X[4x8x8] -Relu-> A -Conv(8 out)-> B[8x8x8] -Relu-> Y. fp32: X, A 1024 B; B, Y 2048 B; W 128 B."""
    return make(
        [helper.make_node("Relu", ["X"], ["A"], name="relu0"),
         helper.make_node("Conv", ["A", "W"], ["B"], name="conv1"),
         helper.make_node("Relu", ["B"], ["Y"], name="relu2")],
        [vi("X", [batch_dim, 4, 8, 8])], [vi("Y", [batch_dim, 8, 8, 8])], [weight("W", (8, 4, 1, 1))],
    )


def residual():
    """R = Relu(X); Y = R + Conv(Relu(Conv(R))): every tensor 4x8x8 fp32 = 1024 B, R held across the block."""
    return make(
        [helper.make_node("Relu", ["X"], ["R"], name="relu0"),
         helper.make_node("Conv", ["R", "W1"], ["A"], name="conv1"),
         helper.make_node("Relu", ["A"], ["B"], name="relu2"),
         helper.make_node("Conv", ["B", "W2"], ["C"], name="conv3"),
         helper.make_node("Add", ["R", "C"], ["Y"], name="add4")],
        [vi("X", [1, 4, 8, 8])], [vi("Y", [1, 4, 8, 8])],
        [weight("W1", (4, 4, 1, 1)), weight("W2", (4, 4, 1, 1))],
    )


def test_chain_exact_bytes():
    r = M.analyze_onnx(chain())
    # relu0: X + A = 1024 + 1024; conv1: A + B = 1024 + 2048 (X dead); relu2: B + Y = 2048 + 2048
    assert live(r) == [2048, 3072, 4096]
    assert (r.peak_bytes, r.peak_node) == (4096, "relu2")
    assert r.nodes[1].alive == ["A", "B"]
    assert (r.layerwise_peak_bytes, r.layerwise_peak_node) == (3072, "conv1")
    assert r.weights_bytes == 8 * 4 * 4
    assert (r.input_bytes, r.output_bytes) == (1024, 2048)
    assert r.inplace_peak_bytes is None


def test_chain_inplace_is_separate_figure():
    r = M.analyze_onnx(chain(), inplace=True)
    assert r.peak_bytes == 4096  # the plain figure is unchanged
    # relu0 may not overwrite the caller's input X; relu2 reuses B's buffer (its last use)
    assert [n.inplace_live_bytes for n in r.nodes] == [2048, 3072, 2048]
    assert (r.inplace_peak_bytes, r.inplace_peak_node) == (3072, "conv1")


def test_residual_block_holds_the_skip_tensor():
    r = M.analyze_onnx(residual(), inplace=True)
    # relu0 X,R | conv1 R,A | relu2 R,A,B | conv3 R,B,C | add4 R,C,Y  (1024 B each)
    assert live(r) == [2048, 2048, 3072, 3072, 3072]
    assert r.nodes[3].alive == ["R", "B", "C"]
    assert (r.peak_bytes, r.peak_node) == (3072, "relu2")
    # the paper's estimate: conv3 costs its input B + output C + the held residual R
    assert (r.layerwise_peak_bytes, r.layerwise_peak_node) == (3072, "conv3")
    # relu2 reuses A's buffer, add4 reuses R's: only conv3 still holds three maps
    assert [n.inplace_live_bytes for n in r.nodes] == [2048, 2048, 2048, 3072, 2048]
    assert (r.inplace_peak_bytes, r.inplace_peak_node) == (3072, "conv3")


def test_inplace_never_overwrites_a_tensor_needed_later():
    model = make(
        [helper.make_node("Relu", ["X"], ["A"], name="n0"),
         helper.make_node("Sigmoid", ["A"], ["B"], name="n1"),
         helper.make_node("Add", ["A", "B"], ["Y"], name="n2")],
        [vi("X", [1, 4, 4, 4])], [vi("Y", [1, 4, 4, 4])],
    )
    r = M.analyze_onnx(model, inplace=True)
    assert live(r) == [512, 512, 768]  # 256 B each
    # n1 may not overwrite A (the Add still reads it); n2 is A's last use, so Y takes A's buffer
    assert [n.inplace_live_bytes for n in r.nodes] == [512, 512, 512]


def test_branch_that_joins():
    model = make(
        [helper.make_node("Relu", ["X"], ["A"], name="relu"),
         helper.make_node("Conv", ["A", "W1"], ["B"], name="left"),
         helper.make_node("Conv", ["A", "W2"], ["C"], name="right"),
         helper.make_node("Concat", ["B", "C"], ["D"], name="join", axis=1)],
        [vi("X", [1, 2, 4, 4])], [vi("D", [1, 8, 4, 4])],
        [weight("W1", (4, 2, 1, 1)), weight("W2", (4, 2, 1, 1))],
    )
    r = M.analyze_onnx(model)
    # X, A: 2x4x4x4 = 128 B; B, C: 4x4x4x4 = 256 B; D: 512 B
    # relu X+A | left A+B | right A+B+C (B waits for the join) | join B+C+D
    assert live(r) == [256, 384, 640, 1024]
    assert (r.peak_bytes, r.peak_node) == (1024, "join")
    assert (r.layerwise_peak_bytes, r.layerwise_peak_node) == (640, "right")
    assert r.weights_bytes == 2 * 8 * 4


def test_graph_input_needed_at_the_end():
    model = make(
        [helper.make_node("Relu", ["X"], ["A"], name="n0"),
         helper.make_node("Sigmoid", ["A"], ["B"], name="n1"),
         helper.make_node("Add", ["X", "B"], ["Y"], name="n2")],
        [vi("X", [1, 4, 4, 4])], [vi("Y", [1, 4, 4, 4])],
    )
    r = M.analyze_onnx(model, inplace=True)
    assert all("X" in n.alive for n in r.nodes)
    assert live(r) == [512, 768, 768]  # 256 B each; X is alive at every node
    assert (r.peak_bytes, r.peak_node) == (768, "n1")
    # B reuses A, Y reuses B; X is the caller's buffer and never overwritten
    assert [n.inplace_live_bytes for n in r.nodes] == [512, 512, 512]
    assert r.layerwise_peak_bytes is None  # no conv: the paper's estimate has nothing to cost


def test_qdq_int8_tensors_cost_one_byte_and_dequantized_weights_are_constants():
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, dtype=np.int8), "zp")
    wq = weight("Wq", (4, 4, 1, 1), np.int8)
    model = make(
        [helper.make_node("QuantizeLinear", ["X", "s", "zp"], ["Q"], name="q"),
         helper.make_node("DequantizeLinear", ["Q", "s", "zp"], ["D"], name="dq"),
         helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wf"], name="dq_w"),
         helper.make_node("Conv", ["D", "Wf"], ["Y"], name="conv")],
        [vi("X", [1, 4, 4, 4])], [vi("Y", [1, 4, 4, 4])], [scale, zp, wq],
    )
    r = M.analyze_onnx(model)
    assert r.tensors["Q"].bytes == 64 and r.tensors["Q"].elem_type == "int8"
    assert "Wf" not in r.tensors  # computed from weights only: not an activation
    assert [n.name for n in r.nodes] == ["q", "dq", "conv"]
    # q: X 256 + Q 64 | dq: Q 64 + D 256 | conv: D 256 + Y 256
    assert live(r) == [320, 320, 512]
    assert r.weights_bytes == 16 + 4 + 1


def test_fp16_graph_costs_two_bytes_and_dtype_recosts():
    model = make([helper.make_node("Relu", ["X"], ["Y"], name="relu")], [vi("X", [1, 4, 8, 8], F16)],
                 [vi("Y", [1, 4, 8, 8], F16)])
    assert M.analyze_onnx(model).peak_bytes == 2 * 256 * 2
    assert M.analyze_onnx(model, dtype="fp32").peak_bytes == 2 * 256 * 4
    assert M.analyze_onnx(model, dtype="int8").peak_bytes == 2 * 256 * 1


def test_dtype_recosts_floats_only():
    model = make(
        [helper.make_node("Relu", ["X"], ["A"], name="relu"),
         helper.make_node("Shape", ["A"], ["S"], name="shape"),
         helper.make_node("Relu", ["A"], ["Y"], name="out")],
        [vi("X", [1, 4, 8, 8])], [vi("S", [4], TensorProto.INT64), vi("Y", [1, 4, 8, 8])],
    )
    # fp32: X, A, Y 1024 B; S int64[4] 32 B.  relu X+A | shape A+S | out A+S+Y
    assert live(M.analyze_onnx(model)) == [2048, 1056, 2080]
    fp16 = M.analyze_onnx(model, dtype="fp16")
    assert live(fp16) == [1024, 544, 1056] and fp16.dtype == "fp16"
    assert M.analyze_onnx(model, dtype="int8").peak_bytes == 256 + 32 + 256
    assert M.analyze_onnx(chain(), dtype="fp16").weights_bytes == 8 * 4 * 2


def test_batch_parameter_scales_activations_not_weights():
    r = M.analyze_onnx(chain(batch_dim="N"), batch=3)
    assert live(r) == [3 * 2048, 3 * 3072, 3 * 4096]
    assert r.weights_bytes == 128
    fixed = M.analyze_onnx(chain(batch_dim=1), batch=2)  # a batch-1 export re-sized
    assert fixed.peak_bytes == 2 * 4096 and fixed.batch == 2


def test_report_dict_is_json_ready_and_in_bytes():
    d = json.loads(json.dumps(M.analyze_onnx(chain(), inplace=True).to_dict()))
    assert d["peak_bytes"] == 4096 and d["inplace_peak_bytes"] == 3072 and d["layerwise_peak_bytes"] == 3072
    assert d["nodes"][2] == {"index": 2, "name": "relu2", "op": "Relu", "live_bytes": 4096, "alive": ["B", "Y"],
                             "is_layer": False, "inplace_live_bytes": 2048}
    assert d["tensors"]["B"] == {"shape": [1, 8, 8, 8], "type": "float32", "bytes": 2048}


def test_manifest_entry(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(residual(), str(path))
    e = M.manifest_entry(path)
    assert json.loads(json.dumps(e)) == e
    assert (e["peak_bytes"], e["inplace_peak_bytes"], e["layerwise_peak_bytes"]) == (3072, 3072, 3072)
    assert (e["peak_node"], e["weights_bytes"], e["batch"], e["dtype"]) == ("relu2", 2 * 64, 1, "as-typed")
    assert "liveness" in e["definition"] and "layer" in e["definition"]


def test_analyze_model_exports_folds_batchnorm_and_restores_mode():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model.train()
    r = analyze_model(model, 32)
    assert model.training
    assert [n.op for n in r.nodes] == ["Conv", "Relu"]  # BatchNorm folded into the conv
    # input 3x32x32x4 = 12288 B, conv output 4x32x32x4 = 16384 B
    assert live(r) == [12288 + 16384, 2 * 16384]
    assert r.layerwise_peak_bytes == 12288 + 16384


# --- errors ---------------------------------------------------------------------------------------


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(UserError, match="bad.onnx"):
        M.analyze_onnx(bad)
    with pytest.raises(UserError, match="not found"):
        M.analyze_onnx(tmp_path / "missing.onnx")


def test_dynamic_dim_without_value_names_the_tensor():
    model = make([helper.make_node("Relu", ["X"], ["Y"])], [vi("X", [1, 4, "height", 8])], [vi("Y", [1, 4, "height", 8])])
    with pytest.raises(UserError, match=r"tensor 'X' has dynamic dimension 'height'.*fixed input size"):
        M.analyze_onnx(model)


def test_unknown_intermediate_shape_names_the_tensor():
    # Reshape to a shape that is itself a graph input: the output's dims cannot be inferred
    model = make([helper.make_node("Reshape", ["X", "shape"], ["Y"])],
                 [vi("X", [1, 4, 8, 8]), vi("shape", [2], TensorProto.INT64)], [vi("Y", None)], check=False)
    with pytest.raises(UserError, match="tensor 'Y'"):
        M.analyze_onnx(model)


def test_unsupported_element_type_names_the_tensor():
    model = make([helper.make_node("Identity", ["S"], ["T"])], [vi("S", [1, 4], TensorProto.STRING)],
                 [vi("T", [1, 4], TensorProto.STRING)])
    with pytest.raises(UserError, match=r"tensor 'S' has element type STRING"):
        M.analyze_onnx(model)


def test_bad_arguments():
    with pytest.raises(UserError, match="fp16"):
        M.analyze_onnx(chain(), dtype="bf8")
    with pytest.raises(UserError, match="batch"):
        M.analyze_onnx(chain(), batch=0)


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_onnx_files_json_plot_and_table(tmp_path, capsys):
    a, b = tmp_path / "chain.onnx", tmp_path / "res.onnx"
    onnx.save(chain(), str(a))
    onnx.save(residual(), str(b))
    js, png = tmp_path / "out" / "mem.json", tmp_path / "out" / "mem.png"
    assert main(["memory", str(a), str(b), "--inplace", "--nodes", "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "4.00 KiB" in out and "relu2 <- peak" in out and "B, Y" in out
    d = json.loads(js.read_text())
    assert [m["peak_bytes"] for m in d["models"]] == [4096, 3072]
    assert d["reductions"][1]["peak_reduction"] == pytest.approx(4096 / 3072, abs=1e-3)
    assert d["command"].startswith("redistill memory ") and "--inplace" in d["command"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_labels_same_named_files_by_their_shortest_distinct_path(tmp_path, capsys):
    paths = [tmp_path / "A" / "model.onnx", tmp_path / "B" / "model.onnx", tmp_path / "x" / "A" / "model.onnx",
             tmp_path / "res.onnx"]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(chain(), str(p))
    js = tmp_path / "mem.json"
    assert main(["memory", *map(str, paths), "--json", str(js)]) == 0
    names = [m["model"] for m in json.loads(js.read_text())["models"]]
    assert names == [f"{tmp_path.name}/A/model.onnx", "B/model.onnx", "x/A/model.onnx", "res.onnx"]
    out = capsys.readouterr().out
    assert all(n in out for n in names)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["memory", str(tmp_path / "nope.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.onnx" in err and "\n" not in err and "Traceback" not in err
    assert main(["memory"]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["memory", "--red-config", "mobilenetv2_x4", str(tmp_path / "x.onnx")]) == 2


def test_cli_arch_mode_with_and_without_red(tmp_path):
    pytest.importorskip("torch")
    js = tmp_path / "arch.json"
    assert main(["memory", "--arch", "mobilenetv3_small-4-22111111111", "--image-size", "32", "--json", str(js)]) == 0
    plain = json.loads(js.read_text())["models"][0]
    assert plain["model"] == "mobilenetv3_small-4-22111111111"
    assert plain["input_bytes"] == 3 * 32 * 32 * 4
    assert plain["peak_bytes"] >= plain["layerwise_peak_bytes"] > 0
    assert main(["memory", "--arch", "mobilenetv3_small-4-22111111111", "--red-config", "mobilenetv3_small_x4",
                 "--image-size", "32", "--json", str(js)]) == 0
    red = json.loads(js.read_text())["models"][0]
    assert red["model"].endswith("+RED")
    ops = [n["op"] for n in red["nodes"]]
    # each RED block adds a sigmoid gate; mobilenetv3_small_x4 has five
    assert ops.count("Sigmoid") == [n["op"] for n in plain["nodes"]].count("Sigmoid") + 5
    assert red["weights_bytes"] > plain["weights_bytes"]


def test_every_inplace_rule_names_real_inputs():
    assert {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Add", "Sub", "Mul", "Div"} <= set(M.INPLACE_RULES.names())
    assert "Conv" not in M.INPLACE_RULES and "Concat" not in M.INPLACE_RULES
    for op in M.INPLACE_RULES.names():
        node = helper.make_node(op, ["a", "b"], ["y"])
        idx = M.INPLACE_RULES.get(op)(node)
        assert idx and all(0 <= k < 2 for k in idx)


def hardswish_graph():
    """Conv -> X; Hardswish at opset 13: H = HardSigmoid(X), Y = Mul(X, H); Z = Relu(Y). Every map 1x4x8x8 = 1 KiB."""
    return make(
        [helper.make_node("Conv", ["I", "W"], ["X"], name="conv"),
         helper.make_node("HardSigmoid", ["X"], ["H"], name="hsig", alpha=1 / 6, beta=0.5),
         helper.make_node("Mul", ["X", "H"], ["Y"], name="mul"),
         helper.make_node("Relu", ["Y"], ["Z"], name="relu")],
        [vi("I", [1, 4, 8, 8])], [vi("Z", [1, 4, 8, 8])], [weight("W", (4, 4, 1, 1))],
    )


def test_hardswish_as_hardsigmoid_then_mul_runs_in_place():
    r = M.analyze_onnx(hardswish_graph(), inplace=True)
    assert live(r) == [2048, 2048, 3072, 2048]  # the literal graph: X, H and Y alive at the Mul
    # in place: H is the Hardswish's own gate (no buffer), Y overwrites X, Z overwrites Y
    assert [n.inplace_live_bytes for n in r.nodes] == [2048, 1024, 1024, 1024]
    assert r.inplace_peak_bytes == 2048 and r.inplace_peak_node == "conv"


def test_binary_op_reuses_a_dying_input_of_its_own_shape_only():
    model = make(
        [helper.make_node("Relu", ["X"], ["A"], name="a"),
         helper.make_node("ReduceMean", ["A"], ["S"], name="pool", axes=[2, 3], keepdims=1),
         helper.make_node("Sigmoid", ["S"], ["G"], name="gate"),
         helper.make_node("Mul", ["G", "A"], ["Y"], name="scale"),
         helper.make_node("Sub", ["Y", "X2"], ["D"], name="sub"),
         helper.make_node("Relu", ["X2"], ["E"], name="e"),
         helper.make_node("Div", ["D", "E"], ["Q"], name="div")],
        [vi("X", [1, 4, 8, 8]), vi("X2", [1, 4, 8, 8])], [vi("Q", [1, 4, 8, 8])],
    )
    r = M.analyze_onnx(model, inplace=True)
    # maps 1 KiB, S and G 16 B; X2 (the caller's) is alive to node e and never overwritten.
    # a: X X2 A | pool: X2 A S | gate: G takes S | scale: G is broadcast (another shape), Y takes A's buffer, not G's
    # sub: D takes Y's | e: E cannot take X2 | div: Q takes D's (D and E both die; the first wins)
    assert [n.inplace_live_bytes for n in r.nodes] == [3072, 2064, 2064, 2064, 2048, 3072, 2048]
    assert live(r) == [3072, 2064, 2080, 3088, 3072, 3072, 3072]


# --- sizes past training's 224 px --------------------------------------------------------------------


def test_memory_of_an_architecture_at_512_px(tmp_path):
    js = tmp_path / "m.json"
    assert main(["memory", "--arch", "mobilenetv3_small-4-22111111111", "--image-size", "512", "--json", str(js)]) == 0
    (m,) = json.loads(js.read_text())["models"]
    assert m["tensors"]["input"]["shape"] == [1, 3, 512, 512] and m["peak_bytes"] > 0


def test_design_config_places_auto_sites_at_512_px():
    from dataclasses import asdict

    from train.design import design_config
    from train.red import auto_sites

    cfg = design_config("resnet34_x4", 512)  # a preset that says red.sites: auto; training refuses 512 px
    assert cfg.data.image_size == 512
    assert [asdict(s) for s in cfg.red.sites] == [
        {**s, "alpha": None, "teacher_where": s.get("teacher_where")}
        for s in auto_sites(cfg.student.arch, cfg.teacher.arch, 512)]
    with pytest.raises(UserError, match="32 to 224"):
        from train.config import load_config

        load_config("resnet34_x4", ["data.image_size=512"])


# --- denoisers: two inputs (x, t) --------------------------------------------------------------------


def test_analyze_model_unet_two_inputs():
    from train.models import build_model

    kw = dict(ch=16, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=1)
    student = analyze_model(build_model("unet-2-221", 0, 32, **kw), 32, inplace=True)
    teacher = analyze_model(build_model("unet-1-222", 0, 32, **kw), 32)
    assert student.model == "unet-2-221"
    # the inputs: x [1,3,32,32] float32 + t [1] float32; the output eps [1,3,32,32]
    assert student.input_bytes == 3 * 32 * 32 * 4 + 4 and student.output_bytes == 3 * 32 * 32 * 4
    assert 0 < student.peak_bytes < teacher.peak_bytes  # the x2 head stride is what the student is for
    assert student.inplace_peak_bytes <= student.peak_bytes


def test_memory_cli_checkpoint_of_a_denoiser(tmp_path, tiny_images, capsys):
    from tests.support.fixtures import tiny_denoiser_checkpoint

    ck = tiny_denoiser_checkpoint(tmp_path / "best.pt", tiny_images, ["cat", "dog", "ship", "truck"])
    out = tmp_path / "mem.json"
    assert main(["memory", "--checkpoint", str(ck), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (r,) = doc["models"]
    assert r["model"] == "unet-2-221+RED" and r["peak_bytes"] > 0
    assert "--checkpoint" in doc["command"]
    assert set(r["tensors"]) >= {"x", "t", "eps"}
    assert main(["memory", "--checkpoint", str(ck), "--arch", "unet-2-221"]) == 2
    assert "--checkpoint CK.pt (exactly one of them)" in capsys.readouterr().err


# --- the walk's cost: one sweep over start/end events, not a rescan of every tensor at every node ---------------


def _rescan(report):
    """The walk by definition: at every node, every tensor whose live range covers it (the quadratic reference)."""
    order = sorted(report.tensors.values(), key=lambda t: (t.producer, t.name))
    return [[t.name for t in order if t.producer <= row.index <= t.last_use] for row in report.nodes]


def random_dag(n_nodes, seed):
    """Relu/Add/Sigmoid nodes reading any earlier tensors (and the input), some tensors never read, several outputs."""
    rng = np.random.default_rng(seed)
    nodes, names = [], ["X"]
    for i in range(n_nodes):
        op = ["Relu", "Add", "Sigmoid", "Mul"][rng.integers(4)]
        k = 1 if op in ("Relu", "Sigmoid") else 2
        ins = [names[j] for j in rng.integers(0, len(names), size=k)]
        nodes.append(helper.make_node(op, ins, [f"t{i}"], name=f"n{i}"))
        names.append(f"t{i}")
    outs = sorted({names[-1], names[len(names) // 2]})
    return make(nodes, [vi("X", [1, 2, 4, 4])], [vi(o, [1, 2, 4, 4]) for o in outs], check=False)


@pytest.mark.parametrize("seed", range(6))
def test_sweep_equals_the_rescan_on_random_graphs(seed):
    r = M.analyze_onnx(random_dag(60, seed), inplace=True)
    assert [row.alive for row in r.nodes] == _rescan(r)
    assert [row.live_bytes for row in r.nodes] == [sum(r.tensors[t].bytes for t in alive) for alive in _rescan(r)]
    assert r.peak_bytes == max(row.live_bytes for row in r.nodes)
    assert all(row.inplace_live_bytes <= row.live_bytes for row in r.nodes)


def test_unread_graph_input_is_never_alive():
    model = make([helper.make_node("Relu", ["X"], ["Y"], name="n0")],
                 [vi("X", [1, 4, 4, 4]), vi("Z", [1, 4, 4, 4])], [vi("Y", [1, 4, 4, 4])])
    r = M.analyze_onnx(model, inplace=True)
    assert r.nodes[0].alive == ["X", "Y"] and (r.peak_bytes, r.inplace_peak_bytes) == (512, 512)


def _relu_chain(n):
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"r{i}") for i in range(n)]
    return make(nodes, [vi("t0", [1, 8, 16, 16])], [vi(f"t{n}", [1, 8, 16, 16])], check=False)


def test_walk_time_grows_linearly_with_the_graph():
    """8x the nodes may take at most 24x the time (linear: 8x; the old rescan: 64x, 13 s at 16k nodes)."""
    import time

    def seconds(n):
        model = _relu_chain(n)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            r = M.analyze_onnx(model, inplace=True)
            best = min(best, time.perf_counter() - t0)
        assert r.peak_bytes == 2 * 8 * 16 * 16 * 4
        return best

    small, large = seconds(2000), seconds(16000)
    assert large < 24 * small, (small, large)
