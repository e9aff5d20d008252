"""Pure index math of the sampling presets (no video needed)."""

from __future__ import annotations

import numpy as np
import pytest

from owlvid.errors import MediaError
from owlvid.media import MAX_FRAMES_HARD_CAP, VideoSampling, frame_at_times, sample_indices

SLOWFAST_8 = [0, 18, 37, 56, 74, 93, 112, 131]
SLOWFAST_16 = [0, 8, 17, 26, 34, 43, 52, 61, 69, 78, 87, 96, 104, 113, 122, 131]
OWL3_README_8 = [8, 24, 41, 57, 74, 90, 107, 123]


# ------------------------------------------------------------------------------------------- owl3

def test_owl3_one_candidate_per_second():
    # bigbuckbunny: 132 frames at 25 fps -> step 25 -> 6 candidates, fewer than 16: all kept
    assert sample_indices("owl3", 132, 25.0) == [0, 25, 50, 75, 100, 125]
    assert sample_indices("owl3", 132, 25.0, max_frames=8) == [0, 25, 50, 75, 100, 125]


def test_owl3_uniform_sample_over_candidates():
    # 3000 frames at 30 fps: 100 candidates (one per second), README uniform_sample to 16:
    # gap 6.25 -> candidate positions int(i*6.25 + 3.125)
    positions = [3, 9, 15, 21, 28, 34, 40, 46, 53, 59, 65, 71, 78, 84, 90, 96]
    assert sample_indices("owl3", 3000, 30.0) == [30 * p for p in positions]


def test_owl3_readme_fixture_is_uniform_sample_over_every_frame():
    # The Owl3 fixture's [8, 24, ...] is uniform_sample(range(132), 8): candidate step 1, i.e. a
    # candidate rate equal to the video frame rate (fps=25), not the README's default of 1 per second.
    assert sample_indices("owl3", 132, 25.0, max_frames=8, fps=25) == OWL3_README_8


@pytest.mark.parametrize(("avg_fps", "step"), [(29.97, 30), (24.5, 24), (25.5, 26), (0.3, 1), (1.0, 1)])
def test_owl3_step_uses_python_round(avg_fps, step):
    assert sample_indices("owl3", 3000, avg_fps, max_frames=4096)[:3] == [0, step, 2 * step]


# -------------------------------------------------------------------------------------- owl3-eval

def test_owl3_eval_middle_of_segments():
    # edges = linspace(0, 132, 17).astype(int); frame k = (edges[k] + edges[k+1] - 1) // 2
    assert sample_indices("owl3-eval", 132, 25.0) == [3, 11, 19, 28, 36, 44, 52, 61, 69, 77, 85, 94, 102,
                                                       110, 118, 127]
    edges = np.linspace(0, 132, 17).astype(int)
    assert sample_indices("owl3-eval", 132, 25.0) == [(edges[k] + edges[k + 1] - 1) // 2 for k in range(16)]


def test_owl3_eval_pads_short_videos_with_last_index():
    assert sample_indices("owl3-eval", 5, 25.0, num_frames=8) == [0, 1, 2, 3, 4, 4, 4, 4]


def test_owl3_eval_num_frames():
    assert sample_indices("owl3-eval", 100, 25.0, num_frames=4) == [12, 37, 62, 87]
    assert sample_indices("owl3-eval", 100, 25.0, max_frames=4) == [12, 37, 62, 87]  # alias


# --------------------------------------------------------------------------------------- slowfast

def test_slowfast_matches_official_fixture_indices():
    assert sample_indices("slowfast", 132, 25.0, max_frames=8) == SLOWFAST_8
    assert sample_indices("slowfast", 132, 25.0, max_frames=16) == SLOWFAST_16
    assert sample_indices("slowfast", 132, 25.0, num_frames=16) == SLOWFAST_16


def test_slowfast_default_64_and_duplicates_on_short_videos():
    assert sample_indices("slowfast", 1000, 30.0) == np.linspace(0, 999, 64).astype(int).tolist()
    assert sample_indices("slowfast", 5, 25.0, max_frames=8) == [0, 0, 1, 1, 2, 2, 3, 4]


# -------------------------------------------------------------------------------------------- fps

def test_fps_preset_times_from_start():
    # 120 frames at 25 fps = 4.8 s; 2 fps -> t = 0, 0.5, ..., 4.5 -> frame floor(t * 25)
    assert sample_indices("fps", 120, 25.0, fps=2) == [0, 12, 25, 37, 50, 62, 75, 87, 100, 112]
    assert sample_indices("fps", 120, 25.0) == [0, 25, 50, 75, 100]  # default 1 fps
    # exactly 5.0 s: t = 5.0 is not inside the video
    assert sample_indices("fps", 125, 25.0, fps=1) == [0, 25, 50, 75, 100]


def test_fps_preset_max_frames_resamples_to_slice_centres():
    # 10 frames at 2 fps > 4: times at centres of 4 slices of 4.8 s: 0.6, 1.8, 3.0, 4.2
    assert sample_indices("fps", 120, 25.0, fps=2, max_frames=4) == [15, 45, 75, 105]


def test_fps_preset_min_frames():
    # 5 frames at 1 fps < 16: times (i + 0.5) * 0.3 s
    assert sample_indices("fps", 120, 25.0, min_frames=16) == [3, 11, 18, 26, 33, 41, 48, 56, 63, 71, 78, 86,
                                                               93, 101, 108, 116]
    with pytest.raises(MediaError, match="min_frames=8 is larger than max_frames=4"):
        sample_indices("fps", 120, 25.0, min_frames=8, max_frames=4)


def test_fps_preset_variable_frame_rate_uses_real_times():
    times = [0.0, 0.1, 0.5, 0.55, 2.0]
    # 1 fps over 2.5 s: t = 0, 1, 2 -> frames shown then: 0 (0.0), 3 (0.55 until 2.0), 4 (from 2.0)
    assert sample_indices("fps", 5, 2.0, fps=1, frame_times=times, duration=2.5) == [0, 3, 4]


def test_frame_at_times():
    assert frame_at_times([0, 0.039, 0.04, 1.0, 4.79, 99], 120, 25.0) == [0, 0, 1, 25, 119, 119]
    assert frame_at_times([0.0, 0.3, 0.55, 1.9], 5, 2.0, np.array([0.0, 0.1, 0.5, 0.55, 2.0])) == [0, 1, 3, 3]


def test_all_preset():
    assert sample_indices("all", 7, 25.0) == list(range(7))
    with pytest.raises(MediaError, match="more than max_frames=5"):
        sample_indices("all", 7, 25.0, max_frames=5)


# ------------------------------------------------------------------------------- VideoSampling

def test_window_applies_preset_inside_and_reports_source_indices():
    s = VideoSampling(preset="slowfast", max_frames=4, start=1.0, end=2.0)
    # frames with t in [1.0, 2.0): 25..49 -> linspace(0, 24, 4) = 0, 8, 16, 24
    assert s.select(120, 25.0) == [25, 33, 41, 49]
    assert VideoSampling(preset="all", start=4.7).select(120, 25.0) == [118, 119]
    assert VideoSampling(preset="owl3", start=1.0).select(120, 25.0) == [25, 50, 75, 100]


def test_explicit_indices_and_timestamps_are_relative_to_window():
    assert VideoSampling(indices=(0, 5)).select(120, 25.0) == [0, 5]
    assert VideoSampling(indices=(0, 5), start=1.0).select(120, 25.0) == [25, 30]
    assert VideoSampling(timestamps=(0.0, 0.5)).select(120, 25.0) == [0, 12]
    assert VideoSampling(timestamps=(0.0, 0.5), start=1.0).select(120, 25.0) == [25, 37]


def test_window_with_variable_frame_rate():
    times = np.array([0.0, 0.1, 0.5, 0.55, 2.0, 2.2])
    assert VideoSampling(preset="all", start=0.5, end=2.0).select(6, 2.5, times, 2.4) == [2, 3]
    assert VideoSampling(timestamps=(0.0, 1.0), start=0.5).select(6, 2.5, times, 2.4) == [2, 3]


def test_order_of_explicit_indices_is_kept():
    assert VideoSampling(indices=(9, 2, 2)).select(10, 25.0) == [9, 2, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "uniform"}, "unknown sampling preset 'uniform'"),
        ({"preset": "owl3", "num_frames": 8}, "num_frames do not apply to sampling preset 'owl3'"),
        ({"preset": "slowfast", "fps": 2.0}, "fps do not apply"),
        ({"indices": (0, 1), "max_frames": 2}, "do not apply to explicit"),
        ({"indices": (0,), "timestamps": (0.0,)}, "either indices= or timestamps="),
        ({"start": 2.0, "end": 1.0}, "end=1.0 must be after start=2.0"),
        ({"start": -1.0}, "start must be a non-negative"),
        ({"indices": (1.5,)}, "must be integers"),
        ({"timestamps": (-1.0,)}, "non-negative"),
    ],
)
def test_invalid_requests(kwargs, message):
    with pytest.raises(MediaError, match=message):
        VideoSampling(**kwargs).select(120, 25.0)


def test_out_of_range_and_caps():
    with pytest.raises(MediaError, match=r"frame index 120 is out of range: the video has 120 frames"):
        VideoSampling(indices=(0, 120)).select(120, 25.0)
    with pytest.raises(MediaError, match="frame index 30 is out of range: the window has 25 frames"):
        VideoSampling(indices=(30,), start=1.0, end=2.0).select(120, 25.0)
    with pytest.raises(MediaError, match="after the end of the video"):
        VideoSampling(timestamps=(5.0,)).select(120, 25.0)
    with pytest.raises(MediaError, match="at or after the end"):
        VideoSampling(preset="all", start=4.8).select(120, 25.0)
    with pytest.raises(MediaError, match="no frame is shown inside the window"):
        VideoSampling(preset="all", start=1.01, end=1.03).select(120, 25.0)
    with pytest.raises(MediaError, match=f"more than the limit of {MAX_FRAMES_HARD_CAP}"):
        VideoSampling(preset="slowfast", max_frames=MAX_FRAMES_HARD_CAP + 1).select(120, 25.0)
    cap_msg = f"5000 frames requested, more than the limit of {MAX_FRAMES_HARD_CAP} "
    with pytest.raises(MediaError, match=cap_msg):
        VideoSampling(preset="all").select(5000, 25.0)
    assert len(VideoSampling(preset="all").select(5000, 25.0, cap=None)) == 5000
    with pytest.raises(MediaError, match="no frames"):
        sample_indices("owl3", 0, 25.0)
    with pytest.raises(MediaError, match="max_frames must be a positive integer"):
        sample_indices("owl3", 10, 25.0, max_frames=0)
