"""Audio demo: spoken digits synthesised offline with espeak-ng, zero-shot on held-out voices.

Each clip is one digit word ("zero".."nine") spoken by a voice = accent + voice variant
(`espeak-ng -v en-us+f2 -s SPEED -p PITCH --stdout seven`). Training uses 12 voices x 4
speeds x 4 pitches (1,920 clips); the test/retrieval splits use 4 other voices, whose
variants never occur in training, x 3 speeds x 3 pitches (360 clips). Clips go through the
`clip-prep shard` audio encoder (mono, resampled from espeak's 22,050 Hz to --sample-rate,
default 16,000 Hz here, FLAC) and keep their natural length (~0.4-1 s); padding/cropping to
a fixed length is the trainer's job. KEY.json records voice, speed, pitch and digit.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from data_prep.audio import AudioOptions, encode_audio_sample
from data_prep.demo_signals import DemoPlan, DemoSample, DemoSize, DemoSpec
from data_prep.samples import Encoded, MissingToolError

ESPEAK = "espeak-ng"
DEFAULT_DEMO_RATE = 16_000
CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_VOICES = ("en+m1", "en+f1", "en-us+m3", "en-us+f2", "en-gb-x-rp+m2", "en-gb-x-rp+f3", "en-gb-scotland+m4",
                "en-029+f4", "en-gb-x-gbclan+m5", "en-us-nyc+f5", "en+m6", "en-gb-x-gbcwmd+m7")
TEST_VOICES = ("en-us+Annie", "en-gb-x-rp+benjamin", "en-029+linda", "en-gb-scotland+Andy")
TRAIN_SPEEDS, TRAIN_PITCHES = (130, 160, 190, 220), (25, 45, 65, 85)  # words/minute, 0-99
TEST_SPEEDS, TEST_PITCHES = (145, 175, 205), (35, 55, 75)
CAPTION_TEMPLATES = (
    "a person saying the number {word}",
    "the spoken digit {digit}",
    "someone says {word}",
    "a voice pronouncing the number {digit}",
    "the word {word}, spoken aloud",
    "a recording of someone saying {word}",
    "a synthetic voice says the digit {word}",
    "{word}, spoken in English",
)
ZERO_SHOT_TEMPLATES = (
    "a recording of the number {c}.",
    "the sound of someone saying {c}.",
    "a voice saying {c}.",
    "the spoken word {c}.",
    "a short clip of the digit {c} being said.",
)
RETRIEVAL_CAPTIONS = 4
INSTALL_HINT = "install it with `apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"


@dataclass(frozen=True)
class AudioJob:
    voice: str
    speed: int
    pitch: int
    digit: int
    captions: tuple[str, ...]
    sample_rate: int


def caption(template: str, digit: int) -> str:
    return template.format(word=CLASSNAMES[digit], digit=digit)


def check_espeak(voices: tuple[str, ...]) -> None:
    """espeak-ng must be installed and know every accent and variant (it silently falls back
    to its default voice for an unknown variant, which would make "held-out voices" a lie)."""
    if shutil.which(ESPEAK) is None:
        raise MissingToolError(f"the audio demo needs {ESPEAK}, which is not installed: {INSTALL_HINT}")
    listing = subprocess.run([ESPEAK, "--voices"], capture_output=True, text=True, check=False).stdout
    variants = subprocess.run([ESPEAK, "--voices=variant"], capture_output=True, text=True, check=False).stdout
    # Language column, plus the "(en 2)" aliases of the last column.
    languages = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    languages |= {word[1:] for word in listing.split() if word.startswith("(")}
    variant_names = {word[3:] for word in variants.split() if word.startswith("!v/")}
    missing = [voice for voice in voices
               if voice.split("+")[0] not in languages or voice.split("+")[1] not in variant_names]
    if missing:
        raise MissingToolError(f"{ESPEAK} lacks the voice(s) {', '.join(missing)}: {INSTALL_HINT} (with espeak-ng-data)")


def _jobs(voices, speeds, pitches, per_class, rate, rng) -> list[AudioJob]:
    combos = [(voice, speed, pitch) for voice in voices for speed in speeds for pitch in pitches]
    jobs = []
    for digit in range(len(CLASSNAMES)):
        chosen = sorted(rng.permutation(len(combos))[:per_class]) if per_class else range(len(combos))
        for index in chosen:
            templates = rng.choice(len(CAPTION_TEMPLATES), RETRIEVAL_CAPTIONS, replace=False)
            captions = tuple(caption(CAPTION_TEMPLATES[t], digit) for t in templates)
            jobs.append(AudioJob(*combos[index], digit, captions, rate))
    return [jobs[i] for i in rng.permutation(len(jobs))]  # classes interleaved in the shards


def plan_demo(rate: int | None, size: DemoSize, seed: int) -> DemoPlan:
    check_espeak(TRAIN_VOICES + TEST_VOICES)
    rate = rate or DEFAULT_DEMO_RATE
    rng = np.random.default_rng([seed, 3])
    train = _jobs(TRAIN_VOICES, TRAIN_SPEEDS, TRAIN_PITCHES, size.train_per_class, rate, rng)
    test = _jobs(TEST_VOICES, TEST_SPEEDS, TEST_PITCHES, size.test_per_class, rate, rng)
    options = {"sample_rate": rate, "seed": seed, "train_voices": list(TRAIN_VOICES), "test_voices": list(TEST_VOICES)}
    spec = DemoSpec("audio", f"demo:{ESPEAK}", CLASSNAMES, ZERO_SHOT_TEMPLATES, options)
    return DemoPlan(spec, train, test)


def synthesise(job: AudioJob) -> bytes:
    command = [ESPEAK, "-v", job.voice, "-s", str(job.speed), "-p", str(job.pitch), "--stdout", CLASSNAMES[job.digit]]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def make_samples(job: AudioJob) -> list[DemoSample]:
    encoded = encode_audio_sample(synthesise(job), job.captions[0], AudioOptions(sample_rate=job.sample_rate))
    if not isinstance(encoded, Encoded):  # espeak output is known-good; this would be a bug
        raise RuntimeError(f"demo clip failed to encode: {encoded}")
    metadata = {"source": f"{ESPEAK} -v {job.voice} -s {job.speed} -p {job.pitch} {CLASSNAMES[job.digit]}",
                **encoded.metadata, "voice": job.voice, "speed": job.speed, "pitch": job.pitch, "digit": job.digit}
    return [DemoSample({"flac": encoded.members["flac"]}, job.digit, list(job.captions), metadata)]
