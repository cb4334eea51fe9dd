"""A run's curves as an inline SVG chart, drawn on the server (the admin's run page): the
training loss, the eval loss at step 0, each checkpoint and the end, and the similarity of
the samples to the photos on its own scale. No script, nothing fetched."""

from collections.abc import Sequence

from django.utils.html import format_html, format_html_join

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 56, 16, 48  # margins: the axes' labels and the legend
TRAINING_COLOUR, EVAL_COLOUR, SIMILARITY_COLOUR = "#7a8ca3", "#d9480f", "#2b8a3e"

Points = Sequence[tuple[float, float]]


def scores_chart_svg(training: Points, evaluation: Points, similarity: Points) -> str:
    """The chart of [(step, value), ...] curves; "" when there is nothing to draw. The two
    losses share the left axis; the similarity (-1 to 1) has the right one."""
    if not training and not evaluation:
        return ""
    steps = [step for step, _ in (*training, *evaluation, *similarity)]
    last_step = max(max(steps), 1)
    losses = [value for _, value in (*training, *evaluation)]
    low, high = _padded_range(losses)
    sim_low, sim_high = _padded_range([value for _, value in similarity])

    def x(step: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * step / last_step

    def y(value: float, bottom: float, top: float) -> float:
        return TOP + (HEIGHT - TOP - BOTTOM) * (top - value) / (top - bottom)

    def loss_xy(points: Points) -> list[tuple[float, float]]:
        return [(x(step), y(value, low, high)) for step, value in points]

    plot_bottom = HEIGHT - BOTTOM
    parts = [
        format_html(
            '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999"/>'
            '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999"/>',
            LEFT,
            TOP,
            LEFT,
            plot_bottom,
            LEFT,
            plot_bottom,
            WIDTH - RIGHT,
            plot_bottom,
        ),
        _label(LEFT - 4, TOP + 4, f"{high:.4g}", "end"),
        _label(LEFT - 4, plot_bottom, f"{low:.4g}", "end"),
        _label(LEFT, plot_bottom + 14, "0", "middle"),
        _label(WIDTH - RIGHT, plot_bottom + 14, f"step {last_step:g}", "middle"),
        _polyline(loss_xy(training), TRAINING_COLOUR, "training loss"),
        _polyline(loss_xy(evaluation), EVAL_COLOUR, "eval loss", dots=True),
    ]
    legend = [(TRAINING_COLOUR, "training loss"), (EVAL_COLOUR, "eval loss")]
    if similarity:
        parts += [
            _label(WIDTH - RIGHT + 4, TOP + 4, f"{sim_high:.3g}", "start"),
            _label(WIDTH - RIGHT + 4, plot_bottom, f"{sim_low:.3g}", "start"),
            _polyline(
                [(x(step), y(value, sim_low, sim_high)) for step, value in similarity],
                SIMILARITY_COLOUR,
                "similarity",
                dots=True,
                dashed=True,
            ),
        ]
        legend.append((SIMILARITY_COLOUR, "similarity (right axis)"))
    parts += [
        format_html(
            '<rect x="{}" y="{}" width="10" height="10" fill="{}"/>',
            LEFT + 170 * index,
            HEIGHT - 16,
            colour,
        )
        + _label(LEFT + 170 * index + 14, HEIGHT - 7, name, "start")
        for index, (colour, name) in enumerate(legend)
    ]
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" viewBox="0 0 {} {}" '
        'role="img" aria-label="loss curves" style="font:11px sans-serif;background:#fff">'
        "{}</svg>",
        WIDTH,
        HEIGHT,
        WIDTH,
        HEIGHT,
        format_html_join("", "{}", ((part,) for part in parts)),
    )


def _padded_range(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def _label(x: float, y: float, text: str, anchor: str) -> str:
    return format_html(
        '<text x="{}" y="{}" text-anchor="{}" fill="#333">{}</text>',
        f"{x:.1f}",
        f"{y:.1f}",
        anchor,
        text,
    )


def _polyline(
    points: list[tuple[float, float]],
    colour: str,
    name: str,
    dots: bool = False,
    dashed: bool = False,
) -> str:
    if not points:
        return ""
    coordinates = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    line = format_html(
        '<polyline points="{}" fill="none" stroke="{}" stroke-width="1.5" '
        'stroke-dasharray="{}"><title>{}</title></polyline>',
        coordinates,
        colour,
        "4 3" if dashed else "none",
        name,
    )
    if not dots:
        return line
    return line + format_html_join(
        "",
        '<circle cx="{}" cy="{}" r="3" fill="{}"/>',
        ((f"{x:.1f}", f"{y:.1f}", colour) for x, y in points),
    )
