"""ECG demo: 12-lead ECGs simulated offline with neurokit2, labelled by heart rate.

Classes (the label is defined by the simulated heart rate, kept 3 bpm clear of the borders):
    0 sinus bradycardia     HR 40-57 bpm
    1 normal sinus rhythm   HR 63-97 bpm
    2 sinus tachycardia     HR 103-140 bpm
No other class is added: neurokit2's `heart_rate_std` only changes RR variability, which
at these settings is not a defined, separable label next to the rate classes.

Cost, measured: `neurokit2.ecg_simulate(method="multileads")` integrates one ODE per lead
and takes ~1-1.5 s of CPU per 10 s record whatever the sampling rate (more at high rates
of the heart). 750 independent records would take minutes on 2 cores, so each
simulation (ECG_SECONDS + SLACK_SECONDS long, at --ecg-rate) yields several records:
10 s windows at random offsets, each with its own per-lead gain (x0.85-1.15), baseline
wander (<= 0.1 mV, 0.05-0.5 Hz) and white noise. Train and test use disjoint simulations
(different seeds and heart rates): the held-out records share no simulation with training.
Records go through the `clip-prep shard` ECG encoder (standard 12 leads, --ecg-rate, 10 s,
float16 KEY.npy); KEY.json records the simulation, heart rate, noise and window offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_prep.demo_signals import DemoPlan, DemoSample, DemoSize, DemoSpec
from data_prep.ecg import STANDARD_LEADS, EcgOptions, encode_ecg_record
from data_prep.ecg_read import EcgRecord
from data_prep.samples import Encoded

CLASSNAMES = ("sinus bradycardia", "normal sinus rhythm", "sinus tachycardia")
HEART_RATES = ((40, 57), (63, 97), (103, 140))
CLASS_PHRASES = (
    ("sinus bradycardia", "bradycardia", "slow sinus rhythm"),
    ("normal sinus rhythm", "sinus rhythm within normal limits", "normal ECG"),
    ("sinus tachycardia", "tachycardia", "fast sinus rhythm"),
)
NOISE_LEVELS = (0.01, 0.03, 0.06)  # neurokit2 `noise` (laplace noise amplitude, mV)
CAPTION_TEMPLATES = (
    "{phrase}, heart rate {hr} bpm",
    "ECG showing {phrase} at {hr} beats per minute",
    "12-lead ECG: {phrase} ({hr} bpm)",
    "{phrase}. Ventricular rate {hr} bpm.",
    "resting ECG with {phrase}, rate {hr}/min",
    "{phrase}",
)
ZERO_SHOT_TEMPLATES = (
    "an ECG of {c}.",
    "a 12-lead electrocardiogram showing {c}.",
    "ECG report: {c}.",
    "this ECG shows {c}.",
)
DEFAULT_TRAIN_PER_CLASS, DEFAULT_TEST_PER_CLASS = 200, 50
WINDOWS_PER_SIMULATION = {"train": 25, "test": 17}
ECG_SECONDS = 10.0
SLACK_SECONDS = 2.0
RETRIEVAL_CAPTIONS = 4


@dataclass(frozen=True)
class EcgSimulation:
    """One neurokit2 simulation and how many windows to cut from it."""

    name: str
    label: int
    heart_rate: int
    noise: float
    seed: int
    windows: int
    rate: int


def caption(template: str, phrase: str, heart_rate: int) -> str:
    text = template.format(phrase=phrase, hr=heart_rate)
    return text[0].upper() + text[1:]


def _simulations(split: str, per_class: int, rate: int, rng: np.random.Generator) -> list[EcgSimulation]:
    count = math.ceil(per_class / WINDOWS_PER_SIMULATION[split])
    sims = []
    for label, (low, high) in enumerate(HEART_RATES):
        windows = [per_class // count + (i < per_class % count) for i in range(count)]
        for i, n in enumerate(windows):
            sims.append(EcgSimulation(f"{split}-{label}-{i}", label, int(rng.integers(low, high + 1)),
                                      float(rng.choice(NOISE_LEVELS)), int(rng.integers(2**31)), n, rate))
    return [sims[i] for i in rng.permutation(len(sims))]


def plan_demo(rate: int | None, size: DemoSize, seed: int) -> DemoPlan:
    import neurokit2  # noqa: F401  (fail before touching --out if it is missing)

    rate = rate or 500
    rng = np.random.default_rng([seed, 4])
    train = _simulations("train", size.train_per_class or DEFAULT_TRAIN_PER_CLASS, rate, rng)
    test = _simulations("test", size.test_per_class or DEFAULT_TEST_PER_CLASS, rate, rng)
    options = {"ecg_rate": rate, "seconds": ECG_SECONDS, "seed": seed, "heart_rates": HEART_RATES,
               "noise_levels": NOISE_LEVELS, "windows_per_simulation": WINDOWS_PER_SIMULATION}
    spec = DemoSpec("ecg", "demo:neurokit2.ecg_simulate(method=multileads)", CLASSNAMES, ZERO_SHOT_TEMPLATES, options)
    return DemoPlan(spec, train, test)


def simulate(sim: EcgSimulation) -> np.ndarray:
    """(12, samples) in mV, leads in neurokit2's (= the standard) order."""
    import neurokit2

    frame = neurokit2.ecg_simulate(duration=ECG_SECONDS + SLACK_SECONDS, sampling_rate=sim.rate,
                                   heart_rate=sim.heart_rate, method="multileads", noise=sim.noise,
                                   random_state=sim.seed)
    assert tuple(frame.columns) == STANDARD_LEADS, frame.columns
    return frame.to_numpy(dtype=np.float64).T


def _window(signal: np.ndarray, sim: EcgSimulation, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    length = int(round(ECG_SECONDS * sim.rate))
    offset = int(rng.integers(0, signal.shape[1] - length + 1))
    time = np.arange(length) / sim.rate
    gains = rng.uniform(0.85, 1.15, size=(signal.shape[0], 1))
    wander_mv, wander_hz = rng.uniform(0.0, 0.1), rng.uniform(0.05, 0.5)
    wander = wander_mv * np.sin(2 * np.pi * wander_hz * time + rng.uniform(0, 2 * np.pi))
    noise = rng.normal(0.0, sim.noise / 2, size=(signal.shape[0], length))
    window = signal[:, offset:offset + length] * gains + wander + noise
    augmentation = {"window_offset_s": offset / sim.rate, "gain_min": float(gains.min()),
                    "gain_max": float(gains.max()), "wander_mv": wander_mv, "wander_hz": wander_hz}
    return window, augmentation


def make_samples(sim: EcgSimulation) -> list[DemoSample]:
    rng = np.random.default_rng(sim.seed)
    signal = simulate(sim)
    options = EcgOptions(rate=sim.rate, seconds=ECG_SECONDS)
    samples = []
    for index in range(sim.windows):
        window, augmentation = _window(signal, sim, rng)
        templates = rng.choice(len(CAPTION_TEMPLATES), RETRIEVAL_CAPTIONS, replace=False)
        phrases = rng.choice(CLASS_PHRASES[sim.label], RETRIEVAL_CAPTIONS)
        captions = [caption(CAPTION_TEMPLATES[t], p, sim.heart_rate) for t, p in zip(templates, phrases)]
        record = EcgRecord(window, list(STANDARD_LEADS), float(sim.rate), ["mV"] * len(STANDARD_LEADS), "neurokit2")
        encoded = encode_ecg_record(record, captions[0], options)
        if not isinstance(encoded, Encoded):  # simulated records are known-good; this would be a bug
            raise RuntimeError(f"demo ECG failed to encode: {encoded}")
        metadata = {"source": f"neurokit2.ecg_simulate[{sim.name}]#{index}", **encoded.metadata,
                    "simulation": sim.name, "heart_rate": sim.heart_rate, "noise": sim.noise, "seed": sim.seed,
                    **augmentation}
        samples.append(DemoSample({"npy": encoded.members["npy"]}, sim.label, captions, metadata))
    return samples
