//! The statistics page's chart: crashes by blame over time as stacked bars
//! in inline SVG, drawn on the server (nothing to load, works offline). A
//! data table with the same numbers follows it for screen readers and for
//! anyone who wants figures rather than bars.

use maud::{html, Markup};
use warden_shared::Blame;

use crate::index::SeriesBucket;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 44.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 8.0;

/// The CSS class that colours a blame (the palette is in console.css and
/// keeps 3:1 contrast against the page for every bar).
pub fn blame_class(b: Blame) -> &'static str {
    match b {
        Blame::System => "b-system",
        Blame::Task => "b-task",
        Blame::ThirdParty => "b-third_party",
        Blame::Unknown => "b-unknown",
    }
}

/// A "nice" axis maximum at or above `n`: 1, 2, 5 × a power of ten.
pub fn axis_max(n: usize) -> usize {
    let mut step = 1usize;
    loop {
        for m in [1, 2, 5] {
            if step.saturating_mul(m) >= n.max(1) {
                return step.saturating_mul(m);
            }
        }
        step = step.saturating_mul(10);
    }
}

/// The axis' labelled values: 0, the middle when it is a whole number,
/// and the top.
pub fn ticks(max: usize) -> Vec<usize> {
    let mut t = vec![0];
    if max.is_multiple_of(2) && max >= 2 {
        t.push(max / 2);
    }
    t.push(max);
    t
}

/// One bar's segments: (blame, count, y, height) from the bottom up.
pub fn segments(bucket: &SeriesBucket, max: usize) -> Vec<(Blame, usize, f64, f64)> {
    let plot = HEIGHT - BOTTOM - TOP;
    let mut y = HEIGHT - BOTTOM;
    let mut out = Vec::new();
    for &(b, n) in &bucket.by_blame {
        if n == 0 {
            continue;
        }
        let h = plot * n as f64 / max.max(1) as f64;
        y -= h;
        out.push((b, n, y, h));
    }
    out
}

/// The chart, or a sentence when there is nothing to draw.
pub fn crashes_by_blame(series: &[SeriesBucket]) -> Markup {
    let peak = series
        .iter()
        .map(|s| s.by_blame.iter().map(|(_, n)| n).sum::<usize>())
        .max()
        .unwrap_or(0);
    if peak == 0 {
        return html! { p.empty { "No job carried a blame in this window." } };
    }
    let max = axis_max(peak);
    let n = series.len().max(1) as f64;
    let slot = (WIDTH - LEFT) / n;
    let bar = (slot * 0.8).max(1.0);
    let label_every = (series.len() / 6).max(1);
    let fmt = if series
        .first()
        .zip(series.last())
        .is_some_and(|(a, b)| (b.until - a.since).num_hours() > 48)
    {
        "%m-%d %H:%M"
    } else {
        "%H:%M"
    };
    let total: usize = series
        .iter()
        .flat_map(|s| s.by_blame.iter().map(|(_, n)| n))
        .sum();
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
                aria-labelledby="chart-title" preserveAspectRatio="xMidYMid meet" {
                title id="chart-title" {
                    (format!("Jobs carrying a blame, by blame, in {} slices: {total} in all, at most {peak} in one slice", series.len()))
                }
                @for tick in ticks(max) {
                    @let y = HEIGHT - BOTTOM - (HEIGHT - BOTTOM - TOP) * tick as f64 / max as f64;
                    line.grid x1=(LEFT) x2=(WIDTH) y1=(y) y2=(y) {}
                    text.axis x=(LEFT - 6.0) y=(y + 4.0) text-anchor="end" { (tick) }
                }
                @for (i, s) in series.iter().enumerate() {
                    @let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
                    @for (b, count, y, h) in segments(s, max) {
                        rect class=(blame_class(b)) x=(format!("{x:.1}")) y=(format!("{y:.1}"))
                            width=(format!("{bar:.1}")) height=(format!("{h:.1}")) {
                            title { (format!("{} to {}: {count} {}", s.since.format("%Y-%m-%d %H:%M"), s.until.format("%H:%M"), b)) }
                        }
                    }
                    @if i % label_every == 0 {
                        text.axis x=(format!("{:.1}", x + bar / 2.0)) y=(HEIGHT - 6.0) text-anchor="middle" {
                            (s.since.format(fmt))
                        }
                    }
                }
            }
            figcaption {
                ul.legend {
                    @for b in Blame::ALL {
                        li { span class=(format!("swatch {}", blame_class(b))) aria-hidden="true" {} (b.as_str()) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn bucket(counts: [usize; 4]) -> SeriesBucket {
        let at = Utc.timestamp_opt(1_800_000_000, 0).single().expect("time");
        SeriesBucket {
            since: at,
            until: at + chrono::Duration::hours(1),
            by_blame: Blame::ALL.iter().copied().zip(counts).collect(),
        }
    }

    #[test]
    fn the_axis_ends_on_a_round_number_at_or_above_the_peak() {
        for (n, want) in [
            (0, 1),
            (1, 1),
            (2, 2),
            (3, 5),
            (7, 10),
            (11, 20),
            (99, 100),
            (501, 1000),
        ] {
            assert_eq!(axis_max(n), want, "{n}");
        }
    }

    #[test]
    fn axis_labels_are_whole_numbers() {
        assert_eq!(ticks(5), [0, 5]);
        assert_eq!(ticks(10), [0, 5, 10]);
        assert_eq!(ticks(1), [0, 1]);
    }

    #[test]
    fn segments_stack_upwards_and_fill_in_proportion() {
        let s = segments(&bucket([2, 0, 1, 1]), 4);
        assert_eq!(s.len(), 3, "an empty blame draws nothing");
        let plot = HEIGHT - BOTTOM - TOP;
        assert!((s[0].3 - plot / 2.0).abs() < 1e-9);
        assert!(
            (s[0].2 + s[0].3 - (HEIGHT - BOTTOM)).abs() < 1e-9,
            "starts on the axis"
        );
        for w in s.windows(2) {
            assert!(
                (w[1].2 + w[1].3 - w[0].2).abs() < 1e-9,
                "each sits on the last"
            );
        }
        assert!((s[2].2 - TOP).abs() < 1e-9, "a full bar reaches the top");
    }

    #[test]
    fn an_empty_window_says_so_instead_of_drawing() {
        let m = crashes_by_blame(&[bucket([0; 4])]).into_string();
        assert!(m.contains("No job carried a blame"), "{m}");
        let m = crashes_by_blame(&[bucket([3, 1, 0, 0]), bucket([0; 4])]).into_string();
        assert!(m.contains("<svg") && m.contains("4 in all"), "{m}");
    }
}
