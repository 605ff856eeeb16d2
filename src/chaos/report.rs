//! `DIR/report.html`: one page an operator opens after a run to see what happened, without tools.
//!
//! Why a page and not only `summary.json`: a verdict says *whether* something went wrong; the
//! throughput and latency around each fault, and a violation drawn as a timeline, say *what* and
//! *when*, which is where debugging starts.
//!
//! The file is self-contained (inline CSS and inline SVG only, no script, no external reference), so it
//! opens offline, from an archive or a CI artifact. Top to bottom:
//! 1. the run (tag, seed, target, workload, nemeses, sizes) and its verdict, coloured;
//! 2. throughput: ok, fail and info operations per second, with every fault window shaded and
//!    labelled with its kind, and the moment everything was healed marked;
//! 3. latency of acknowledged operations (a log-scale scatter, with per-second p50 and p99), shaded
//!    the same way;
//! 4. availability: the [`Stats`](super::verdict::Stats) of the verdict plus ok/s during faults and
//!    outside them, and the longest outage after each kind of fault against issue #13's targets;
//! 5. each checker's verdict, and the fault windows as a table;
//! 6. for a linearizability violation, the offending sub-history as a timeline (one row per client,
//!    one bar per operation from invocation to completion, an `info` operation open to the right,
//!    the operation that could not be linearized outlined) and the longest linearizable prefix.
//!
//! Keys, values and outputs are client data: every string is escaped (`escape`) and long values
//! are cut for display. The page stays small for long runs: the latency scatter draws at most
//! [`MAX_SCATTER_POINTS`] points (the slowest always, the rest sampled at a fixed stride), the
//! timeline at most [`MAX_TIMELINE_OPS`] operations, a throughput series at most [`MAX_BUCKETS`]
//! steps. Rendering is a pure function of its input: the same run gives the same bytes. The final
//! reads of the append workload are not part of the workload's throughput or latency and are left
//! out of the charts (they still count in the statistics).

use super::history::NemesisEvent;
use super::verdict::{FaultOutage, Summary};
use super::workload::FINAL_READER;
use super::{EXIT_INVALID, EXIT_VALID};
use crate::check::{OpKind, Operation, Status, Violation};
use clap::ValueEnum;
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::path::Path;

/// The report's file name in the run directory.
pub const FILE: &str = "report.html";
/// Most points the latency scatter draws; beyond it the slowest 500 are kept and the rest sampled
/// at a fixed stride.
pub const MAX_SCATTER_POINTS: usize = 3000;
/// Slowest operations the scatter always keeps (the outliers are what a reader looks for).
const SLOWEST_KEPT: usize = 500;
/// Most operations the violation's timeline draws.
pub const MAX_TIMELINE_OPS: usize = 50;
/// Most steps of a throughput series: a longer run gets buckets of several seconds.
pub const MAX_BUCKETS: u64 = 3600;
/// Operations of the linearizable prefix listed (the last ones: nearest to the failure).
const MAX_PREFIX_SHOWN: usize = 100;
/// Characters of a value shown in a timeline label, and in a description.
const LABEL_CHARS: usize = 16;
const TEXT_CHARS: usize = 160;

const NS_PER_SEC: u64 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// What a report is drawn from, all borrowed from the run's verdict (`run::judge`).
#[derive(Clone, Copy, Debug)]
pub struct ReportInput<'a> {
    /// The run's summary: flags, statistics, each checker's verdict.
    pub summary: &'a Summary,
    /// Every recorded operation, as the clients saw them (`history.jsonl`).
    pub ops: &'a [Operation],
    /// The nemesis's events (`nemesis.jsonl`), on the same clock.
    pub events: &'a [NemesisEvent],
    /// When the workload started (ns on the run's clock).
    pub from: u64,
    /// When the workload was told to stop.
    pub to: u64,
    /// When everything was healed.
    pub healed_at: u64,
    /// The checker's violation, if it found one.
    pub violation: Option<&'a Violation>,
}

/// The report as one HTML document.
pub fn render(input: &ReportInput<'_>) -> String {
    let end = chart_end(input);
    let windows = fault_windows(input.events, end);
    let marks = Marks {
        healed_at: input.healed_at,
        violation_at: input.violation.map(|v| v.failed_op.invoke),
    };
    let mut html = String::with_capacity(64 * 1024);
    html.push_str(&head(input.summary));
    html.push_str(&header(input.summary));
    html.push_str(&throughput_section(input.ops, &windows, &marks, end));
    html.push_str(&latency_section(input.ops, &windows, &marks, end));
    html.push_str(&availability_section(input, &windows));
    html.push_str(&checkers_section(input.summary));
    html.push_str(&faults_section(&windows));
    if let Some(violation) = input.violation {
        html.push_str(&violation_section(violation));
    }
    html.push_str("</body>\n</html>\n");
    html
}

/// Render the report and write it to `path`.
pub fn write(path: &Path, input: &ReportInput<'_>) -> std::io::Result<()> {
    std::fs::write(path, render(input))
}

// ---------------------------------------------------------------------------------------------
// The run's fault windows and time axis.

/// One fault as the nemesis played it, from its `start` event to its `stop`.
#[derive(Clone, Debug, PartialEq)]
struct FaultWindow<'a> {
    start: u64,
    stop: u64,
    kind: &'a str,
    nodes: &'a [u64],
    detail: &'a str,
}

/// The fault windows of `events`, paired as [`super::verdict::fault_windows`] pairs them (a start
/// with the next stop of its kind), so the shading matches the statistics; a fault still open at a
/// `heal-all` event closes there, one still open at the end closes at `end` (it was active, and
/// leaving it out would hide it).
fn fault_windows(events: &[NemesisEvent], end: u64) -> Vec<FaultWindow<'_>> {
    let mut open: BTreeMap<&str, &NemesisEvent> = BTreeMap::new();
    let mut windows = Vec::new();
    for event in events {
        match (event.phase, event.fault) {
            ("start", fault) => {
                open.insert(fault, event);
            }
            (_, "heal-all") => {
                let still_open = std::mem::take(&mut open);
                windows.extend(still_open.into_values().map(|s| window(s, event.time)));
            }
            (_, fault) => {
                if let Some(start) = open.remove(fault) {
                    windows.push(window(start, event.time));
                }
            }
        }
    }
    windows.extend(open.into_values().map(|s| window(s, end)));
    windows.sort_by_key(|w| (w.start, w.stop));
    windows
}

/// The window that `start` opened, closed at `stop`.
fn window(start: &NemesisEvent, stop: u64) -> FaultWindow<'_> {
    FaultWindow {
        start: start.time,
        stop: stop.max(start.time),
        kind: start.fault,
        nodes: &start.nodes,
        detail: &start.detail,
    }
}

/// The operations of the workload itself (the append workload's final reads left out).
fn workload_ops(ops: &[Operation]) -> impl Iterator<Item = &Operation> {
    ops.iter().filter(|op| op.client != FINAL_READER)
}

/// When an operation ended for the client (an `info` one: when the client gave up).
fn ended(op: &Operation) -> u64 {
    op.complete.unwrap_or(op.invoke).max(op.invoke)
}

/// The right end of the run's charts: the last thing that happened, at least one second.
fn chart_end(input: &ReportInput<'_>) -> u64 {
    let last_op = workload_ops(input.ops).map(ended).max().unwrap_or(0);
    let last_event = input.events.iter().map(|e| e.time).max().unwrap_or(0);
    [input.to, input.healed_at, last_op, last_event, NS_PER_SEC]
        .into_iter()
        .max()
        .unwrap_or(NS_PER_SEC)
}

/// Vertical markers drawn on both run charts.
struct Marks {
    healed_at: u64,
    violation_at: Option<u64>,
}

/// Maps a clock (ns) onto an x axis.
#[derive(Clone, Copy, Debug)]
struct Scale {
    t0: u64,
    t1: u64,
    left: f64,
    width: f64,
}

impl Scale {
    fn x(&self, t: u64) -> f64 {
        let span = self.t1.saturating_sub(self.t0).max(1) as f64;
        let t = t.clamp(self.t0, self.t1.max(self.t0));
        self.left + (t - self.t0) as f64 / span * self.width
    }

    fn right(&self) -> f64 {
        self.left + self.width
    }
}

const CHART_W: f64 = 960.0;
const CHART_H: f64 = 250.0;
const PLOT_LEFT: f64 = 64.0;
const PLOT_RIGHT: f64 = 16.0;
const PLOT_TOP: f64 = 22.0;
const PLOT_BOTTOM: f64 = 34.0;

/// The plot area of a run chart: time from 0 to `end` across, a value from 0 to 1 up.
#[derive(Clone, Copy, Debug)]
struct Frame {
    scale: Scale,
    top: f64,
    height: f64,
}

impl Frame {
    fn over(end: u64) -> Frame {
        Frame {
            scale: Scale {
                t0: 0,
                t1: end,
                left: PLOT_LEFT,
                width: CHART_W - PLOT_LEFT - PLOT_RIGHT,
            },
            top: PLOT_TOP,
            height: CHART_H - PLOT_TOP - PLOT_BOTTOM,
        }
    }

    /// The y of `fraction` of the plot's height (0 at the bottom, 1 at the top), clamped.
    fn y(&self, fraction: f64) -> f64 {
        let fraction = if fraction.is_finite() { fraction } else { 0.0 };
        self.top + self.height * (1.0 - fraction.clamp(0.0, 1.0))
    }

    fn bottom(&self) -> f64 {
        self.top + self.height
    }
}

/// An `<svg>` of the run charts' size around `body`.
fn svg(label: &str, height: f64, body: &str) -> String {
    format!(
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} {height}\" width=\"{CHART_W}\" \
         height=\"{height}\" role=\"img\" aria-label=\"{}\">\n{body}</svg>\n",
        escape(label)
    )
}

/// Gridlines and labels of the time axis in seconds since the run started.
fn time_axis(frame: &Frame) -> String {
    let span = frame.scale.t1 as f64 / NS_PER_SEC as f64;
    let step = nice_step(span, 12.0);
    let mut out = String::new();
    for t in ticks(span, step) {
        let x = frame.scale.x((t * NS_PER_SEC as f64) as u64);
        out.push_str(&format!(
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\"/>\
             <text class=\"tick\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            frame.top,
            frame.bottom(),
            frame.bottom() + 14.0,
            fmt_tick(t, step)
        ));
    }
    out.push_str(&format!(
        "<line class=\"axis\" x1=\"{:.1}\" y1=\"{b:.1}\" x2=\"{:.1}\" y2=\"{b:.1}\"/>\
         <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">time since start (s)</text>\n",
        frame.scale.left,
        frame.scale.right(),
        frame.scale.right(),
        frame.bottom() + 28.0,
        b = frame.bottom(),
    ));
    out
}

/// One horizontal gridline with its label at `fraction` of the plot's height.
fn y_gridline(frame: &Frame, fraction: f64, label: &str) -> String {
    let y = frame.y(fraction);
    format!(
        "<line class=\"grid\" x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>\
         <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
        frame.scale.left,
        frame.scale.right(),
        frame.scale.left - 6.0,
        y + 4.0,
        escape(label)
    )
}

/// The kind's CSS class (colour): the known families, else a neutral one.
fn kind_class(kind: &str) -> &'static str {
    match kind {
        "kill" => "f-kill",
        "pause" => "f-pause",
        "partition" => "f-partition",
        "loss" => "f-loss",
        "slow" => "f-slow",
        "clock" => "f-clock",
        "restart-all" => "f-restart",
        "reconfigure" => "f-reconfigure",
        _ => "f-other",
    }
}

/// One line describing a window (a tooltip, a table row).
fn window_title(w: &FaultWindow<'_>) -> String {
    format!(
        "{}: {} to {} ({}): {}",
        w.kind,
        fmt_secs(w.start),
        fmt_secs(w.stop),
        fmt_duration(w.stop - w.start),
        w.detail
    )
}

/// A shaded band per fault window, labelled with its kind where the label fits inside the band (a
/// 10-minute run has 60 windows a few pixels wide; their labels would print over each other — the
/// legend and each band's tooltip name them instead).
fn fault_bands(frame: &Frame, windows: &[FaultWindow<'_>]) -> String {
    let mut out = String::new();
    for w in windows {
        let (x0, x1) = (frame.scale.x(w.start), frame.scale.x(w.stop));
        let label = if x1 - x0 >= label_width(w.kind) {
            format!(
                "<text class=\"band-label\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                x0 + 3.0,
                frame.top + 12.0,
                escape(w.kind)
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "<g class=\"fault-window\"><title>{}</title>\
             <rect class=\"band {}\" x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"/>\
             {label}</g>\n",
            escape(&window_title(w)),
            kind_class(w.kind),
            frame.top,
            (x1 - x0).max(1.0),
            frame.height,
        ));
    }
    out
}

/// Room a band label needs (px): about 7 px a character in the plots' bold 11-12 px type, plus the
/// 3 px inset on each side.
fn label_width(text: &str) -> f64 {
    text.chars().count() as f64 * 7.0 + 6.0
}

/// A dashed vertical line at `t`, labelled above the plot.
fn vertical_mark(frame: &Frame, t: u64, label: &str, class: &str) -> String {
    let x = frame.scale.x(t);
    format!(
        "<g><title>{} at {}</title><line class=\"mark {class}\" x1=\"{x:.1}\" y1=\"{:.1}\" \
         x2=\"{x:.1}\" y2=\"{:.1}\"/><text class=\"mark-label {class}\" x=\"{x:.1}\" y=\"{:.1}\" \
         text-anchor=\"middle\">{}</text></g>\n",
        escape(label),
        fmt_secs(t),
        frame.top - 4.0,
        frame.bottom(),
        frame.top - 7.0,
        escape(label)
    )
}

fn marks(frame: &Frame, marks: &Marks) -> String {
    let mut out = vertical_mark(frame, marks.healed_at, "healed", "mark-heal");
    if let Some(t) = marks.violation_at {
        out.push_str(&vertical_mark(frame, t, "violation", "mark-violation"));
    }
    out
}

/// An HTML legend: (CSS class of the swatch, label).
fn legend(items: &[(&str, &str)]) -> String {
    let spans: String = items
        .iter()
        .map(|(class, label)| {
            format!(
                "<span><i class=\"key {class}\"></i>{}</span>",
                escape(label)
            )
        })
        .collect();
    format!("<p class=\"legend\">{spans}</p>\n")
}

fn band_legend(windows: &[FaultWindow<'_>]) -> Vec<(&'static str, &'static str)> {
    let mut kinds: Vec<(&'static str, &'static str)> = Vec::new();
    for w in windows {
        let item = (kind_class(w.kind), band_name(w.kind));
        if !kinds.contains(&item) {
            kinds.push(item);
        }
    }
    kinds
}

fn band_name(kind: &str) -> &'static str {
    match kind {
        "kill" => "kill",
        "pause" => "pause",
        "partition" => "partition",
        "loss" => "loss",
        "slow" => "slow",
        "clock" => "clock",
        "restart-all" => "restart-all",
        "reconfigure" => "reconfigure",
        _ => "other fault",
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput.

/// The bucket width for a run ending at `end`: one second, wider past [`MAX_BUCKETS`] seconds.
fn bucket_ns(end: u64) -> u64 {
    let seconds = end.div_ceil(NS_PER_SEC);
    NS_PER_SEC * seconds.div_ceil(MAX_BUCKETS).max(1)
}

/// Operations per bucket, `[ok, fail, info]`, each counted when it ended for its client.
fn per_bucket(ops: &[Operation], end: u64, bucket: u64) -> Vec<[u64; 3]> {
    let n = end.div_ceil(bucket).clamp(1, MAX_BUCKETS + 1);
    let mut counts = vec![[0u64; 3]; usize::try_from(n).unwrap_or(1)];
    let last = counts.len().saturating_sub(1);
    for op in workload_ops(ops) {
        let i = usize::try_from(ended(op) / bucket).map_or(last, |i| i.min(last));
        let series = match op.status {
            Status::Ok => 0,
            Status::Fail => 1,
            Status::Info => 2,
        };
        if let Some(bucket) = counts.get_mut(i) {
            bucket[series] += 1;
        }
    }
    counts
}

/// One series as a step line: each bucket a horizontal segment at its rate.
fn step_path(frame: &Frame, rates: &[f64], bucket: u64, ymax: f64, class: &str) -> String {
    let mut d = String::new();
    for (i, rate) in rates.iter().enumerate() {
        let y = frame.y(rate / ymax);
        let x1 = frame.scale.x((i as u64 + 1).saturating_mul(bucket));
        if i == 0 {
            d.push_str(&format!("M{:.1} {y:.1}", frame.scale.x(0)));
        } else {
            d.push_str(&format!("V{y:.1}"));
        }
        d.push_str(&format!("H{x1:.1}"));
    }
    format!("<path class=\"series {class}\" d=\"{d}\"/>\n")
}

fn throughput_section(
    ops: &[Operation],
    windows: &[FaultWindow<'_>],
    mark: &Marks,
    end: u64,
) -> String {
    let frame = Frame::over(end);
    let bucket = bucket_ns(end);
    let counts = per_bucket(ops, end, bucket);
    let per_sec = NS_PER_SEC as f64 / bucket as f64;
    let rates =
        |series: usize| -> Vec<f64> { counts.iter().map(|c| c[series] as f64 * per_sec).collect() };
    let series = [rates(0), rates(1), rates(2)];
    let max = series.iter().flatten().copied().fold(0.0, f64::max);
    let ymax = nice_ceil(max);
    let mut body = fault_bands(&frame, windows);
    let step = nice_step(ymax, 4.0);
    for v in ticks(ymax, step) {
        body.push_str(&y_gridline(&frame, v / ymax, &fmt_tick(v, step)));
    }
    body.push_str(&time_axis(&frame));
    for (rates, class) in series.iter().zip(["s-ok", "s-fail", "s-info"]) {
        body.push_str(&step_path(&frame, rates, bucket, ymax, class));
    }
    body.push_str(&marks(&frame, mark));
    let mut items = vec![("k-ok", "ok/s"), ("k-fail", "fail/s"), ("k-info", "info/s")];
    items.extend(band_legend(windows));
    let width = match bucket / NS_PER_SEC {
        1 => "1-second".to_string(),
        n => format!("{n}-second"),
    };
    format!(
        "<h2>Throughput</h2>\n<p class=\"note\">Operations per second in {width} buckets, counted \
         when each ended for its client; fault windows shaded.</p>\n{}{}",
        svg("operations per second over time", CHART_H, &body),
        legend(&items)
    )
}

// ---------------------------------------------------------------------------------------------
// Latency.

/// An acknowledged operation's invocation time and latency (ns).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Latency {
    invoke: u64,
    latency: u64,
}

fn latencies(ops: &[Operation]) -> Vec<Latency> {
    workload_ops(ops)
        .filter(|op| op.status == Status::Ok)
        .filter_map(|op| {
            op.complete.map(|c| Latency {
                invoke: op.invoke,
                latency: c.saturating_sub(op.invoke),
            })
        })
        .collect()
}

/// At most `cap` of `all`: the slowest `SLOWEST_KEPT` (capped at `cap`) always, the rest taken
/// at a fixed stride in recorded order; the result in invocation order. Deterministic.
fn sample_points(all: &[Latency], cap: usize) -> Vec<Latency> {
    if all.len() <= cap {
        return all.to_vec();
    }
    let mut by_latency: Vec<usize> = (0..all.len()).collect();
    by_latency.sort_by_key(|&i| (Reverse(all[i].latency), i));
    let slowest = SLOWEST_KEPT.min(cap);
    let mut keep = vec![false; all.len()];
    for &i in by_latency.iter().take(slowest) {
        keep[i] = true;
    }
    let room = cap - slowest;
    let rest: Vec<usize> = (0..all.len()).filter(|&i| !keep[i]).collect();
    if room > 0 {
        let stride = rest.len().div_ceil(room).max(1);
        for &i in rest.iter().step_by(stride).take(room) {
            keep[i] = true;
        }
    }
    let mut sample: Vec<Latency> = (0..all.len())
        .filter(|&i| keep[i])
        .map(|i| all[i])
        .collect();
    sample.sort_by_key(|p| (p.invoke, p.latency));
    sample
}

/// The decades (powers of ten, in ms) the latency axis spans.
fn decades(all: &[Latency]) -> (i32, i32) {
    let ms = |ns: u64| (ns as f64 / NS_PER_MS as f64).max(0.001);
    let min = all.iter().map(|p| p.latency).min().unwrap_or(NS_PER_MS);
    let max = all.iter().map(|p| p.latency).max().unwrap_or(NS_PER_MS);
    let lo = ms(min).log10().floor() as i32;
    let hi = (ms(max).log10().ceil() as i32).max(lo + 1);
    (lo, hi)
}

/// The nearest-rank percentile `p` of sorted `values` (not empty).
fn percentile(sorted: &[u64], p: usize) -> u64 {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).or(sorted.last()).copied().unwrap_or(0)
}

/// Per-bucket percentiles `p` of the latencies, by invocation time; `None` for an empty bucket.
fn bucket_percentiles(
    all: &[Latency],
    end: u64,
    bucket: u64,
    ps: [usize; 2],
) -> Vec<[Option<u64>; 2]> {
    let n = usize::try_from(end.div_ceil(bucket).clamp(1, MAX_BUCKETS + 1)).unwrap_or(1);
    let mut groups: Vec<Vec<u64>> = vec![Vec::new(); n];
    for p in all {
        let i = usize::try_from(p.invoke / bucket).map_or(n - 1, |i| i.min(n - 1));
        if let Some(group) = groups.get_mut(i) {
            group.push(p.latency);
        }
    }
    groups
        .into_iter()
        .map(|mut group| {
            group.sort_unstable();
            match group.is_empty() {
                true => [None, None],
                false => ps.map(|p| Some(percentile(&group, p))),
            }
        })
        .collect()
}

fn latency_section(
    ops: &[Operation],
    windows: &[FaultWindow<'_>],
    mark: &Marks,
    end: u64,
) -> String {
    let frame = Frame::over(end);
    let all = latencies(ops);
    let (lo, hi) = decades(&all);
    let y = |latency: u64| {
        let ms = (latency as f64 / NS_PER_MS as f64).max(0.001);
        frame.y((ms.log10() - f64::from(lo)) / f64::from(hi - lo))
    };
    let mut body = fault_bands(&frame, windows);
    for d in lo..=hi {
        let ns = 10f64.powi(d) * NS_PER_MS as f64;
        body.push_str(&y_gridline(
            &frame,
            f64::from(d - lo) / f64::from(hi - lo),
            &fmt_duration(ns as u64),
        ));
    }
    body.push_str(&time_axis(&frame));
    let sample = sample_points(&all, MAX_SCATTER_POINTS);
    let mut dots = String::new();
    for p in &sample {
        dots.push_str(&format!(
            "M{:.1} {:.1}h0",
            frame.scale.x(p.invoke),
            y(p.latency)
        ));
    }
    if !dots.is_empty() {
        body.push_str(&format!("<path class=\"dots\" d=\"{dots}\"/>\n"));
    }
    let bucket = bucket_ns(end);
    let lines = bucket_percentiles(&all, end, bucket, [50, 99]);
    for (series, class) in [(0, "p50"), (1, "p99")] {
        body.push_str(&percentile_path(&frame, &lines, series, bucket, &y, class));
    }
    body.push_str(&marks(&frame, mark));
    if all.is_empty() {
        body.push_str(&format!(
            "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no acknowledged \
             operation</text>\n",
            frame.scale.left + frame.scale.width / 2.0,
            frame.top + frame.height / 2.0
        ));
    }
    let mut items = vec![
        ("k-dot", "one acknowledged operation"),
        ("k-p50", "p50 per second"),
        ("k-p99", "p99 per second"),
    ];
    items.extend(band_legend(windows));
    let shown = match sample.len() < all.len() {
        true => format!(
            " {} of {} operations drawn: the {} slowest and an even sample of the rest.",
            sample.len(),
            all.len(),
            SLOWEST_KEPT.min(sample.len())
        ),
        false => String::new(),
    };
    format!(
        "<h2>Latency</h2>\n<p class=\"note\">Acknowledged operations: completion minus invocation \
         (log scale), placed at their invocation; fault windows shaded.{shown}</p>\n{}{}",
        svg(
            "latency of acknowledged operations over time",
            CHART_H,
            &body
        ),
        legend(&items)
    )
}

/// A percentile series as a line through bucket midpoints, broken where a bucket is empty.
fn percentile_path(
    frame: &Frame,
    lines: &[[Option<u64>; 2]],
    series: usize,
    bucket: u64,
    y: &dyn Fn(u64) -> f64,
    class: &str,
) -> String {
    let mut d = String::new();
    let mut pen_down = false;
    for (i, values) in lines.iter().enumerate() {
        let Some(value) = values[series] else {
            pen_down = false;
            continue;
        };
        let x = frame
            .scale
            .x((i as u64).saturating_mul(bucket).saturating_add(bucket / 2));
        let command = if pen_down { 'L' } else { 'M' };
        d.push_str(&format!("{command}{x:.1} {:.1}", y(value)));
        pen_down = true;
    }
    match d.is_empty() {
        true => String::new(),
        false => format!("<path class=\"{class}\" d=\"{d}\"/>\n"),
    }
}

// ---------------------------------------------------------------------------------------------
// Availability, checkers, faults.

/// Acknowledged operations of the workload during faults and outside them, and how long each
/// lasted, within the workload's span.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct FaultSplit {
    fault_ns: u64,
    ok_during: u64,
    clear_ns: u64,
    ok_outside: u64,
}

/// The windows clipped to `[from, to]` and merged where they overlap.
fn merged(windows: &[FaultWindow<'_>], from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = windows
        .iter()
        .map(|w| (w.start.max(from), w.stop.min(to)))
        .filter(|(a, b)| a < b)
        .collect();
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in spans {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn split_by_faults(
    ops: &[Operation],
    windows: &[FaultWindow<'_>],
    from: u64,
    to: u64,
) -> FaultSplit {
    let spans = merged(windows, from, to);
    let fault_ns: u64 = spans.iter().map(|(a, b)| b - a).sum();
    let mut split = FaultSplit {
        fault_ns,
        clear_ns: to.saturating_sub(from).saturating_sub(fault_ns),
        ..FaultSplit::default()
    };
    for op in workload_ops(ops).filter(|op| op.status == Status::Ok) {
        let Some(done) = op.complete.filter(|t| (from..=to).contains(t)) else {
            continue;
        };
        match spans.iter().any(|&(a, b)| (a..=b).contains(&done)) {
            true => split.ok_during += 1,
            false => split.ok_outside += 1,
        }
    }
    split
}

/// `count` per second over `ns`, or a dash when there was no such time.
fn rate(count: u64, ns: u64) -> String {
    match ns {
        0 => "—".to_string(),
        ns => format!("{:.1}", count as f64 * NS_PER_SEC as f64 / ns as f64),
    }
}

fn share(part: usize, whole: usize) -> String {
    match whole {
        0 => String::new(),
        whole => format!(" ({:.1}%)", part as f64 * 100.0 / whole as f64),
    }
}

/// A two-column table of (label, value); both escaped.
fn facts_table(class: &str, rows: &[(&str, String)]) -> String {
    let body: String = rows
        .iter()
        .map(|(label, value)| {
            format!(
                "<tr><th>{}</th><td>{}</td></tr>\n",
                escape(label),
                escape(value)
            )
        })
        .collect();
    format!("<table class=\"{class}\">\n{body}</table>\n")
}

fn availability_section(input: &ReportInput<'_>, windows: &[FaultWindow<'_>]) -> String {
    let s = &input.summary.stats;
    let split = split_by_faults(input.ops, windows, input.from, input.to);
    let mut rows = vec![
        ("operations", s.ops.to_string()),
        (
            "ok (acknowledged)",
            format!("{}{}", s.ok, share(s.ok, s.ops)),
        ),
        (
            "fail (not applied)",
            format!("{}{}", s.fail, share(s.fail, s.ops)),
        ),
        (
            "info (outcome unknown)",
            format!("{}{}", s.info, share(s.info, s.ops)),
        ),
        ("ok/s over the workload", format!("{:.1}", s.ok_per_sec)),
        (
            "ok/s during faults",
            format!(
                "{} ({} ok in {} of faults)",
                rate(split.ok_during, split.fault_ns),
                split.ok_during,
                fmt_duration(split.fault_ns)
            ),
        ),
        (
            "ok/s outside faults",
            format!(
                "{} ({} ok in {} without a fault)",
                rate(split.ok_outside, split.clear_ns),
                split.ok_outside,
                fmt_duration(split.clear_ns)
            ),
        ),
        (
            "longest stretch without an acknowledged operation",
            format!(
                "{} ms, from {}",
                s.longest_outage_ms,
                fmt_secs(s.longest_outage_start_ms.saturating_mul(NS_PER_MS))
            ),
        ),
        (
            "ok completed during a fault",
            s.ok_during_faults.to_string(),
        ),
        (
            "ok completed after every fault was healed",
            format!(
                "{} (healed at {})",
                s.ok_after_heal,
                fmt_secs(input.healed_at)
            ),
        ),
        ("fault windows", input.summary.faults.to_string()),
    ];
    if input.summary.workload == super::workload::WorkloadKind::Append {
        rows.push((
            "info appends the final read showed never happened (checked as fail)",
            input.summary.info_appends_resolved.to_string(),
        ));
    }
    format!(
        "<h2>Availability</h2>\n{}{}",
        facts_table("facts", &rows),
        outage_table(&s.outage_by_fault)
    )
}

/// The longest outage after each kind of fault, with issue #13's target where it sets one.
fn outage_table(outages: &[FaultOutage]) -> String {
    if outages.is_empty() {
        return String::new();
    }
    let body: String = outages
        .iter()
        .map(|o| {
            let (class, target) = match (o.target_ms, o.within_target) {
                (Some(t), Some(true)) => ("good", format!("≤ {t} ms: met")),
                (Some(t), _) => ("bad", format!("≤ {t} ms: missed")),
                (None, _) => ("", "—".to_string()),
            };
            format!(
                "<tr class=\"outage-row\"><td><i class=\"key {}\"></i>{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{} ms</td><td class=\"num\">{}</td><td>{}</td>\
                 <td><span class=\"word {class}\">{}</span></td></tr>\n",
                kind_class(family(&o.kind)),
                escape(&o.kind),
                o.faults,
                o.longest_outage_ms,
                fmt_secs(o.longest_outage_start_ms.saturating_mul(NS_PER_MS)),
                escape(o.measured_from),
                escape(&target)
            )
        })
        .collect();
    format!(
        "<h3>Longest stretch without an acknowledged operation, by kind of fault</h3>\n\
         <p class=\"note\">Measured from the fault's start (restart-all: from the moment its last \
         node was restarted) to the first acknowledgement after the fault; the worst fault of each \
         kind.</p>\n<table class=\"outages\">\n<tr><th>kind</th><th>faults</th><th>longest</th>\
         <th>from</th><th>measured from</th><th>target</th></tr>\n{body}</table>\n"
    )
}

/// The family of a fault kind (`kill-leader` → `kill`), for its colour.
fn family(kind: &str) -> &str {
    match kind {
        "restart-all" => kind,
        _ => kind.split('-').next().unwrap_or(kind),
    }
}

/// The CSS class of a checker's word.
fn word_class(good: bool, bad: bool) -> &'static str {
    match (good, bad) {
        (true, _) => "good",
        (_, true) => "bad",
        _ => "unknown",
    }
}

fn checkers_section(s: &Summary) -> String {
    let mut rows = vec![(
        "linearizability".to_string(),
        word_class(s.linearizable == "ok", s.linearizable == "violation"),
        s.linearizable.to_string(),
        s.check.clone(),
    )];
    for invariant in &s.invariants {
        let word = match invariant.holds {
            Some(true) => "holds",
            Some(false) => "VIOLATED",
            None => "undecided",
        };
        rows.push((
            invariant.name.to_string(),
            word_class(
                invariant.holds == Some(true),
                invariant.holds == Some(false),
            ),
            word.to_string(),
            invariant.detail.clone(),
        ));
    }
    let body: String = rows
        .iter()
        .map(|(name, class, word, detail)| {
            format!(
                "<tr><th>{}</th><td><span class=\"word {class}\">{}</span></td><td>{}</td></tr>\n",
                escape(name),
                escape(word),
                escape(detail)
            )
        })
        .collect();
    format!(
        "<h2>Verdict per checker</h2>\n<table class=\"checkers\">\n\
         <tr><th>checker</th><th>result</th><th>detail</th></tr>\n{body}</table>\n"
    )
}

fn faults_section(windows: &[FaultWindow<'_>]) -> String {
    if windows.is_empty() {
        return "<h2>Faults</h2>\n<p>No fault was injected.</p>\n".to_string();
    }
    let body: String = windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let nodes: Vec<String> = w.nodes.iter().map(u64::to_string).collect();
            format!(
                "<tr class=\"fault-row\"><td class=\"num\">{}</td><td><i class=\"key {}\"></i>{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td>{}</td><td>{}</td></tr>\n",
                i + 1,
                kind_class(w.kind),
                escape(w.kind),
                fmt_secs(w.start),
                fmt_secs(w.stop),
                fmt_duration(w.stop - w.start),
                escape(&nodes.join(",")),
                escape(w.detail)
            )
        })
        .collect();
    format!(
        "<h2>Faults</h2>\n<table class=\"faults\">\n<tr><th>#</th><th>kind</th><th>from</th>\
         <th>to</th><th>length</th><th>nodes</th><th>what</th></tr>\n{body}</table>\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Head and header.

const CSS: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1000px;\
padding:0 16px;color:#212121;background:#fff}\
h1{font-size:22px;margin:0 0 6px}\
h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #e0e0e0;padding-bottom:4px}\
h3{font-size:15px;margin:16px 0 6px}\
table{border-collapse:collapse;margin:6px 0}\
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}\
th{font-weight:600;color:#555}\
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
.verdict{display:inline-block;font-size:18px;font-weight:700;padding:6px 14px;border-radius:6px;margin:6px 0}\
.good{color:#1b5e20;background:#c8e6c9}.bad{color:#b71c1c;background:#ffcdd2}\
.unknown{color:#8a4b00;background:#ffe0b2}\
.word{font-weight:600;padding:1px 6px;border-radius:4px;white-space:nowrap}\
.note{color:#616161;font-size:12.5px;margin:2px 0}\
.legend{font-size:12.5px;color:#424242;margin:2px 0 8px}.legend span{margin-right:14px}\
.key{display:inline-block;width:14px;height:10px;vertical-align:middle;margin-right:4px;border-radius:2px}\
.k-ok{background:#2e7d32}.k-fail{background:#ef6c00}.k-info{background:#6a1b9a}\
.k-dot{background:#1565c0;opacity:.6;width:8px;height:8px;border-radius:4px}\
.k-p50{background:#00897b;height:3px}.k-p99{background:#c62828;height:3px}\
svg.chart{max-width:100%;height:auto;display:block;font:11px system-ui,sans-serif}\
.grid{stroke:#eee}.axis{stroke:#9e9e9e}.tick{fill:#616161}\
.band{stroke:none}\
.f-kill{fill:rgba(211,47,47,.16);background:rgba(211,47,47,.3)}\
.f-pause{fill:rgba(123,31,162,.16);background:rgba(123,31,162,.3)}\
.f-partition{fill:rgba(245,124,0,.2);background:rgba(245,124,0,.35)}\
.f-loss{fill:rgba(25,118,210,.16);background:rgba(25,118,210,.3)}\
.f-slow{fill:rgba(85,139,47,.18);background:rgba(85,139,47,.32)}\
.f-clock{fill:rgba(249,168,37,.2);background:rgba(249,168,37,.35)}\
.f-restart{fill:rgba(136,14,79,.2);background:rgba(136,14,79,.35)}\
.f-reconfigure{fill:rgba(0,131,143,.16);background:rgba(0,131,143,.3)}\
.f-other{fill:rgba(97,97,97,.16);background:rgba(97,97,97,.3)}\
.band-label{fill:#5d4037;font-weight:600}\
.series{fill:none;stroke-width:1.5}.s-ok{stroke:#2e7d32}.s-fail{stroke:#ef6c00}.s-info{stroke:#6a1b9a}\
.dots{fill:none;stroke:#1565c0;stroke-opacity:.45;stroke-width:3;stroke-linecap:round}\
.p50{fill:none;stroke:#00897b;stroke-width:1.5}.p99{fill:none;stroke:#c62828;stroke-width:1.5}\
.mark{stroke-width:1.5;stroke-dasharray:5 3}.mark-label{font-weight:600;stroke:none}\
line.mark-heal{stroke:#2e7d32}text.mark-heal{fill:#2e7d32}\
line.mark-violation{stroke:#c62828}text.mark-violation{fill:#c62828}\
.row{fill:#fafafa}.row-label{fill:#424242}\
.tl-op .bar{stroke:#37474f;stroke-width:.5}\
.tl-op.ok .bar{fill:#a5d6a7}.tl-op.fail .bar{fill:#ffcc80}.tl-op.info .bar{stroke:none}\
.tl-op.failed .bar{stroke:#c62828;stroke-width:2.5}\
.tl-label{fill:#212121;font-family:ui-monospace,Menlo,monospace;font-size:10.5px}\
.tl-op.failed .tl-label{fill:#b71c1c;font-weight:700}\
ol.ops{font-family:ui-monospace,Menlo,monospace;font-size:12.5px;padding-left:3.5em}\
code{font-family:ui-monospace,Menlo,monospace;font-size:12.5px}";

fn head(s: &Summary) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>chaos run {}: {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n",
        escape(&s.tag),
        escape(s.verdict)
    )
}

/// The CSS class of the verdict: what the exit status says.
fn verdict_class(exit_code: u8) -> &'static str {
    match exit_code {
        EXIT_VALID => "good",
        EXIT_INVALID => "bad",
        _ => "unknown",
    }
}

fn lower(value: impl std::fmt::Debug) -> String {
    format!("{value:?}").to_lowercase()
}

fn header(s: &Summary) -> String {
    // As typed on the command line (`restart-all`), not as the type spells it.
    let nemeses: Vec<String> = s
        .nemesis
        .iter()
        .map(|n| {
            n.to_possible_value()
                .map_or_else(|| lower(n), |v| v.get_name().to_string())
        })
        .collect();
    let self_test = match s.self_test {
        true => {
            "<p class=\"note\">Self-test: the servers carried a deliberate safety bug; the run \
                 passes only if the checker caught it.</p>\n"
        }
        false => "",
    };
    let rows = [
        ("seed", s.seed.to_string()),
        ("target", lower(s.target)),
        ("workload", lower(s.workload)),
        ("store", lower(s.store)),
        ("nemeses", nemeses.join(", ")),
        ("nodes", s.nodes.to_string()),
        ("clients", s.clients.to_string()),
        ("requested rate", format!("{} ops/s", s.rate)),
        ("faulty phase", format!("{:.0} s", s.time_secs)),
        ("fault windows", s.faults.to_string()),
    ];
    format!(
        "<header>\n<h1>chaos run {}</h1>\n<div class=\"verdict {}\">verdict: {} (exit {})</div>\n\
         {self_test}{}</header>\n",
        escape(&s.tag),
        verdict_class(s.exit_code),
        escape(s.verdict),
        s.exit_code,
        facts_table("facts", &rows)
    )
}

// ---------------------------------------------------------------------------------------------
// The violation.

/// The operations the timeline draws (at most [`MAX_TIMELINE_OPS`]), in invocation order, each with
/// whether it is the failed one, and how many the sub-history held. The failed op first, then the
/// operations still running when it was invoked (acknowledged or failed ones before `info` ones),
/// then those that ended before it, latest first: what can explain the failure is what overlaps or
/// just precedes it.
fn timeline_ops(v: &Violation) -> (Vec<(&Operation, bool)>, usize) {
    let mut all: Vec<&Operation> = v.sub_history.iter().collect();
    let failed = match all.iter().position(|op| **op == v.failed_op) {
        Some(i) => i,
        None => {
            all.push(&v.failed_op);
            all.len() - 1
        }
    };
    let total = all.len();
    let invoked = v.failed_op.invoke;
    let rank = |i: usize, op: &Operation| -> (u8, Reverse<u64>) {
        match (i == failed, op.effective_complete()) {
            (true, _) => (0, Reverse(0)),
            (false, Some(done)) if done >= invoked => (1, Reverse(op.invoke)),
            (false, None) => (2, Reverse(op.invoke)),
            (false, Some(done)) => (3, Reverse(done)),
        }
    };
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by_key(|&i| (rank(i, all[i]), i));
    order.truncate(MAX_TIMELINE_OPS);
    order.sort_by_key(|&i| (all[i].invoke, all[i].client, i));
    let chosen = order.into_iter().map(|i| (all[i], i == failed)).collect();
    (chosen, total)
}

const TL_LEFT: f64 = 110.0;
const TL_RIGHT: f64 = 16.0;
const TL_TOP: f64 = 8.0;
const TL_ROW: f64 = 24.0;
const TL_BAR: f64 = 16.0;
const TL_AXIS: f64 = 34.0;

fn client_name(client: u64) -> String {
    match client {
        FINAL_READER => "final reader".to_string(),
        c => format!("client {c}"),
    }
}

/// The timeline: a row per client, a bar per operation from invocation to completion.
fn timeline(ops: &[(&Operation, bool)]) -> String {
    let mut rows: BTreeMap<u64, usize> = BTreeMap::new();
    for (op, _) in ops {
        rows.insert(op.client, 0);
    }
    for (i, row) in rows.values_mut().enumerate() {
        *row = i;
    }
    let t0 = ops.iter().map(|(op, _)| op.invoke).min().unwrap_or(0);
    // An info operation is open-ended: when its client gave up does not stretch the axis.
    let known_end = |op: &Operation| match op.status {
        Status::Info => op.invoke,
        Status::Ok | Status::Fail => ended(op),
    };
    let last = ops.iter().map(|(op, _)| known_end(op)).max().unwrap_or(t0);
    let span = last.saturating_sub(t0).max(NS_PER_MS);
    // Room on the right for the open ends of info operations.
    let scale = Scale {
        t0,
        t1: t0.saturating_add(span + span / 8),
        left: TL_LEFT,
        width: CHART_W - TL_LEFT - TL_RIGHT,
    };
    let height = TL_TOP + rows.len() as f64 * TL_ROW + TL_AXIS;
    let mut body = String::from(
        "<defs><linearGradient id=\"tl-open\"><stop offset=\"0\" stop-color=\"#ce93d8\"/>\
         <stop offset=\"1\" stop-color=\"#ce93d8\" stop-opacity=\"0\"/></linearGradient></defs>\n",
    );
    for (client, row) in &rows {
        let y = TL_TOP + *row as f64 * TL_ROW;
        body.push_str(&format!(
            "<rect class=\"row\" x=\"0\" y=\"{y:.1}\" width=\"{CHART_W}\" height=\"{:.1}\"/>\
             <text class=\"row-label\" x=\"6\" y=\"{:.1}\">{}</text>\n",
            TL_ROW - 2.0,
            y + TL_ROW / 2.0 + 3.0,
            escape(&client_name(*client))
        ));
    }
    body.push_str(&timeline_axis(&scale, TL_TOP + rows.len() as f64 * TL_ROW));
    for (op, failed) in ops {
        let row = rows.get(&op.client).copied().unwrap_or(0);
        let y = TL_TOP + row as f64 * TL_ROW + (TL_ROW - 2.0 - TL_BAR) / 2.0;
        body.push_str(&timeline_bar(&scale, y, op, *failed));
    }
    svg(
        "the offending sub-history, one row per client",
        height,
        &body,
    )
}

/// Ticks in milliseconds after the timeline's first invocation.
fn timeline_axis(scale: &Scale, bottom: f64) -> String {
    let span_ms = scale.t1.saturating_sub(scale.t0) as f64 / NS_PER_MS as f64;
    let step = nice_step(span_ms, 10.0);
    let mut out = String::new();
    for v in ticks(span_ms, step) {
        let x = scale.x(scale.t0.saturating_add((v * NS_PER_MS as f64) as u64));
        out.push_str(&format!(
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{TL_TOP}\" x2=\"{x:.1}\" y2=\"{bottom:.1}\"/>\
             <text class=\"tick\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">+{}</text>\n",
            bottom + 14.0,
            fmt_tick(v, step)
        ));
    }
    out.push_str(&format!(
        "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">ms after {}</text>\n",
        scale.right(),
        bottom + 28.0,
        fmt_secs(scale.t0)
    ));
    out
}

/// One operation: a bar from invocation to completion (an `info` one fades out to the right: it
/// may take effect at any time after its invocation), its label and a tooltip with everything.
fn timeline_bar(scale: &Scale, y: f64, op: &Operation, failed: bool) -> String {
    let x0 = scale.x(op.invoke);
    let (x1, fill) = match op.status {
        Status::Info => (scale.right(), " fill=\"url(#tl-open)\""),
        Status::Ok | Status::Fail => (scale.x(ended(op)), ""),
    };
    let shapes = format!(
        "<rect class=\"bar\" x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{TL_BAR}\" \
         rx=\"2\"{fill}/>",
        (x1 - x0).max(2.0)
    );
    let marker = if failed { "✗ " } else { "" };
    format!(
        "<g class=\"tl-op {}{}\"><title>{}</title>{shapes}<text class=\"tl-label\" x=\"{:.1}\" \
         y=\"{:.1}\">{}</text></g>\n",
        status_word(op.status),
        if failed { " failed" } else { "" },
        escape(&format!(
            "{}{}",
            if failed {
                "could not be linearized: "
            } else {
                ""
            },
            describe(op)
        )),
        x0 + 3.0,
        y + TL_BAR - 4.5,
        escape(&format!("{marker}{}", short_label(op)))
    )
}

fn violation_section(v: &Violation) -> String {
    let (ops, total) = timeline_ops(v);
    let shown = match ops.len() < total {
        true => format!(
            " {} of its {total} operations are drawn: the failed one, those concurrent with it and \
             those just before it.",
            ops.len()
        ),
        false => String::new(),
    };
    format!(
        "<h2>Violation on key {}</h2>\n<p>Cannot linearize operation #{}: <code>{}</code></p>\n\
         <h3>Offending sub-history</h3>\n<p class=\"note\">One row per client; each bar runs from \
         invocation to completion; an info operation (outcome unknown) fades out to the right, \
         since it may take effect at any time after its invocation; the operation that could not \
         be linearized is outlined in red. Hover a bar for the whole operation.{shown}</p>\n{}{}",
        escape(&quoted(&v.key, TEXT_CHARS)),
        v.failed_index,
        escape(&describe(&v.failed_op)),
        timeline(&ops),
        prefix_list(v)
    )
}

fn prefix_list(v: &Violation) -> String {
    let n = v.linearized_prefix.len();
    let skip = n.saturating_sub(MAX_PREFIX_SHOWN);
    let mut out = format!("<h3>Longest linearizable prefix ({n} operations)</h3>\n");
    if n == 0 {
        out.push_str("<p>Empty: no operation of this key could be linearized before it.</p>\n");
        return out;
    }
    if skip > 0 {
        out.push_str(&format!(
            "<p class=\"note\">The first {skip} are left out; the last {} lead up to the failure.</p>\n",
            n - skip
        ));
    }
    out.push_str(&format!("<ol class=\"ops\" start=\"{}\">\n", skip + 1));
    for op in v.linearized_prefix.iter().skip(skip) {
        out.push_str(&format!("<li>{}</li>\n", escape(&describe(op))));
    }
    out.push_str("</ol>\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Operations as text.

fn status_word(status: Status) -> &'static str {
    match status {
        Status::Ok => "ok",
        Status::Fail => "fail",
        Status::Info => "info",
    }
}

/// At most `max` characters of `s`, with an ellipsis if cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// A client string quoted (Rust escapes make control characters and quotes visible), cut at `max`.
fn quoted(s: &str, max: usize) -> String {
    format!("{:?}", truncate(s, max))
}

/// A value as shown: quoted, or ∅ for none (an absent key, a cas that deletes).
fn value(v: Option<&str>, max: usize) -> String {
    v.map_or_else(|| "∅".to_string(), |s| quoted(s, max))
}

/// The call, with its key and arguments.
fn call(op: &Operation) -> String {
    let key = quoted(&op.key, TEXT_CHARS);
    let arg = |v: &Option<String>| value(v.as_deref(), TEXT_CHARS);
    match op.op {
        OpKind::Get => format!("get({key})"),
        OpKind::Put => format!("put({key}, {})", arg(&op.value)),
        OpKind::Append => format!("append({key}, {})", arg(&op.value)),
        OpKind::Delete => format!("delete({key})"),
        OpKind::Cas => format!("cas({key}, {} → {})", arg(&op.expected), arg(&op.value)),
    }
}

/// What the client learnt.
fn outcome(op: &Operation, max: usize) -> String {
    match (op.status, op.op) {
        (Status::Info, _) => "unknown".to_string(),
        (Status::Fail, _) => "not applied".to_string(),
        (Status::Ok, OpKind::Get) => value(op.output.as_deref(), max),
        (Status::Ok, OpKind::Cas) => match op.cas_outcome() {
            Some(true) => "swapped".to_string(),
            Some(false) => "mismatch".to_string(),
            None => "?".to_string(),
        },
        (Status::Ok, _) => "ok".to_string(),
    }
}

/// The whole operation on one line.
fn describe(op: &Operation) -> String {
    let end = match (op.status, op.complete) {
        (Status::Info, Some(gave_up)) => format!("∞ (client gave up at {})", fmt_secs(gave_up)),
        (Status::Info, None) => "∞".to_string(),
        (_, complete) => complete.map_or_else(|| "?".to_string(), fmt_secs),
    };
    format!(
        "{}: {} → {} [{} – {}] {}",
        client_name(op.client),
        call(op),
        outcome(op, TEXT_CHARS),
        fmt_secs(op.invoke),
        end,
        status_word(op.status)
    )
}

/// A bar's label: the key is the same for every bar, so only the operation and its result.
fn short_label(op: &Operation) -> String {
    let v = |v: &Option<String>| value(v.as_deref(), LABEL_CHARS);
    let what = match op.op {
        OpKind::Get => "get".to_string(),
        OpKind::Put => format!("put {}", v(&op.value)),
        OpKind::Append => format!("append {}", v(&op.value)),
        OpKind::Delete => "delete".to_string(),
        OpKind::Cas => format!("cas {}→{}", v(&op.expected), v(&op.value)),
    };
    let result = match (op.status, op.op) {
        (Status::Ok, OpKind::Get) => outcome(op, LABEL_CHARS),
        (Status::Ok, OpKind::Cas) => match op.cas_outcome() {
            Some(true) => "✓".to_string(),
            Some(false) => "✗".to_string(),
            None => "?".to_string(),
        },
        (Status::Ok, _) => "ok".to_string(),
        (Status::Fail, _) => "fail".to_string(),
        (Status::Info, _) => "?".to_string(),
    };
    format!("{what} → {result}")
}

// ---------------------------------------------------------------------------------------------
// Numbers and escaping.

/// A time on the run's clock, in seconds.
fn fmt_secs(ns: u64) -> String {
    format!("{:.3} s", ns as f64 / NS_PER_SEC as f64)
}

/// A duration in the unit that reads best.
fn fmt_duration(ns: u64) -> String {
    match ns {
        ns if ns < 1_000 => format!("{ns} ns"),
        ns if ns < NS_PER_MS => format!("{} µs", ns / 1_000),
        ns if ns < NS_PER_SEC => format!("{} ms", ns / NS_PER_MS),
        ns => format!("{:.2} s", ns as f64 / NS_PER_SEC as f64),
    }
}

/// The smallest of 1, 2, 5 × 10^k that is at least `v` (1 for nothing to show).
fn nice_ceil(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * p)
}

/// A step of 1, 2, 5 × 10^k giving about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    nice_ceil(span / target.max(1.0))
}

/// Multiples of `step` from 0 to `span` (at most 1,000 of them).
fn ticks(span: f64, step: f64) -> Vec<f64> {
    if !(step.is_finite() && step > 0.0 && span.is_finite()) {
        return vec![0.0];
    }
    (0..=1000)
        .map(|i| f64::from(i) * step)
        .take_while(|t| *t <= span * (1.0 + 1e-9))
        .collect()
}

/// A tick value with as many decimals as its step needs.
fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// `text` made safe as HTML text or a quoted attribute value: the five markup characters become
/// entities, and control characters other than newline and tab (which HTML refuses) become U+FFFD.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::args::Target;
    use crate::chaos::nemesis::NemesisKind;
    use crate::chaos::verdict;
    use crate::chaos::workload::{StoreKind, WorkloadKind};
    use crate::check::CheckResult;

    const S: u64 = NS_PER_SEC;
    const MS: u64 = NS_PER_MS;
    const KEY: &str = "<script>";

    struct Fixture {
        summary: Summary,
        ops: Vec<Operation>,
        events: Vec<NemesisEvent>,
        violation: Violation,
    }

    impl Fixture {
        fn input(&self) -> ReportInput<'_> {
            ReportInput {
                summary: &self.summary,
                ops: &self.ops,
                events: &self.events,
                from: 0,
                to: 30 * S,
                healed_at: 25 * S,
                violation: Some(&self.violation),
            }
        }
    }

    fn event(time: u64, phase: &'static str, fault: &'static str, detail: &str) -> NemesisEvent {
        NemesisEvent {
            time,
            phase,
            fault,
            kind: match fault {
                "kill" => "kill-leader",
                other => other,
            },
            nodes: vec![1, 2],
            detail: detail.to_string(),
        }
    }

    fn events() -> Vec<NemesisEvent> {
        vec![
            event(
                8 * S,
                "start",
                "partition",
                "partition (Halves): cut 1-2 <&>",
            ),
            event(12 * S, "stop", "partition", "healed"),
            event(18 * S, "start", "kill", "SIGKILL node(s) 2"),
            event(22 * S, "stop", "kill", "healed"),
            event(25 * S, "stop", "heal-all", "every fault healed"),
        ]
    }

    /// A register-like workload: 4 clients, one op every 300 ms each for 30 s; slow, failed and
    /// indeterminate operations during the two fault windows.
    fn workload() -> Vec<Operation> {
        let mut ops = Vec::new();
        for n in 0..100u64 {
            for client in 0..4u64 {
                let invoke = n * 300 * MS + client * 70 * MS;
                let key = format!("r{}", n % 3);
                let op = match (n + client) % 3 {
                    0 => Operation::get(client, key, Some("1")),
                    1 => Operation::put(client, key, "2"),
                    _ => Operation::cas(client, key, Some("1"), Some("3"), n % 2 == 0),
                };
                let faulty =
                    (8 * S..12 * S).contains(&invoke) || (18 * S..22 * S).contains(&invoke);
                let op = match (faulty, n % 3) {
                    (true, 0) => Operation {
                        complete: Some(invoke + 1500 * MS),
                        ..op.info_at(invoke)
                    },
                    (true, 1) => op.fail_at(invoke, invoke + 20 * MS),
                    (true, _) => op.ok_at(invoke, invoke + 400 * MS + n * MS),
                    (false, _) => op.ok_at(invoke, invoke + 2 * MS + (n * 7 % 13) * MS),
                };
                ops.push(op);
            }
        }
        ops
    }

    /// On key `<script>`: a read of a value nobody wrote.
    fn violation_ops() -> Vec<Operation> {
        vec![
            Operation::put(1, KEY, "<b>1</b>").ok_at(5 * S, 5 * S + 20 * MS),
            Operation {
                complete: Some(6 * S),
                ..Operation::put(2, KEY, "2").info_at(5 * S + 10 * MS)
            },
            Operation::get(3, KEY, Some("<b>1</b>")).ok_at(5 * S + 30 * MS, 5 * S + 40 * MS),
            Operation::cas(1, KEY, Some("<b>1</b>"), Some("3"), true)
                .ok_at(5 * S + 50 * MS, 5 * S + 70 * MS),
            Operation::get(2, KEY, Some("7'\"")).ok_at(5 * S + 80 * MS, 5 * S + 90 * MS),
        ]
    }

    fn summary(ops: &[Operation], events: &[NemesisEvent], result: &CheckResult) -> Summary {
        let windows = verdict::fault_windows(events);
        let invariants = vec![verdict::recovery_invariant(ops, 25 * S)];
        let (linearizable, check) = verdict::linearizability(result);
        let (word, exit_code) = verdict::decide(linearizable, &invariants);
        Summary {
            tag: "chaos-4242".into(),
            seed: 7,
            target: Target::Local,
            workload: WorkloadKind::Register,
            store: StoreKind::Replicated,
            self_test: false,
            nemesis: vec![NemesisKind::Partition, NemesisKind::Kill],
            nodes: 3,
            clients: 4,
            rate: 13,
            time_secs: 25.0,
            faults: windows.len(),
            stats: verdict::Stats {
                outage_by_fault: verdict::fault_outages(ops, events, 30 * S),
                ..verdict::stats(ops, &windows, 0, 30 * S, 25 * S)
            },
            info_appends_resolved: 0,
            linearizable,
            check,
            invariants,
            verdict: word,
            exit_code,
        }
    }

    fn fixture() -> Fixture {
        let mut ops = workload();
        let bad = violation_ops();
        let failed_index = ops.len() + bad.len() - 1;
        ops.extend(bad.iter().cloned());
        let violation = Violation {
            key: KEY.to_string(),
            linearized_prefix: bad[..4].to_vec(),
            failed_op: bad[4].clone(),
            failed_index,
            sub_history: bad,
        };
        let events = events();
        let result = CheckResult::Violation(Box::new(violation.clone()));
        Fixture {
            summary: summary(&ops, &events, &result),
            ops,
            events,
            violation,
        }
    }

    /// No NaN or infinity was formatted into the page ("info" is the only word with "inf").
    fn finite_numbers_only(html: &str) -> bool {
        !html.contains("NaN")
            && html
                .match_indices("inf")
                .all(|(i, _)| html[i + 3..].starts_with('o'))
    }

    /// A long run's narrow windows keep their bands (and tooltips) but not labels that would print
    /// over each other; a wide window keeps its label.
    #[test]
    fn only_labels_that_fit_their_band_are_drawn() {
        let s = 1_000_000_000;
        let frame = Frame::over(600 * s);
        let mut windows: Vec<FaultWindow<'_>> = (0..60)
            .map(|i| FaultWindow {
                start: (5 + 10 * i) * s,
                stop: (10 + 10 * i) * s,
                kind: "partition-isolate-leader",
                nodes: &[],
                detail: "cut",
            })
            .collect();
        windows.push(FaultWindow {
            start: 0,
            stop: 300 * s,
            kind: "kill",
            nodes: &[],
            detail: "long",
        });
        let svg = fault_bands(&frame, &windows);
        assert_eq!(svg.matches("<rect class=\"band ").count(), 61);
        assert_eq!(svg.matches("<title>").count(), 61);
        assert_eq!(svg.matches("class=\"band-label\"").count(), 1, "{svg}");
        assert!(svg.contains(">kill</text>"));
    }

    #[test]
    fn a_violation_renders_every_part_escaped() {
        let f = fixture();
        let html = render(&f.input());
        // Each fault window is shaded once in each of the two run charts, and listed once.
        assert_eq!(html.matches("class=\"fault-window\"").count(), 2 * 2);
        assert_eq!(html.matches("class=\"fault-row\"").count(), 2);
        assert!(html.contains(">partition</text>") && html.contains(">kill</text>"));
        assert!(html.contains("verdict: invalid (exit 1)"));
        assert!(html.contains("class=\"verdict bad\""));
        assert!(html.contains("Violation on key"));
        // Client data is escaped everywhere, never raw.
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("&lt;b&gt;1&lt;/b&gt;"));
        assert!(!html.contains("<script"), "raw client data in the page");
        assert!(!html.contains("<b>"), "raw client data in the page");
        assert!(html.contains("cut 1-2 &lt;&amp;&gt;"));
        // One bar per sub-history operation, the failed one marked.
        assert_eq!(
            html.matches("class=\"tl-op ").count(),
            f.violation.sub_history.len()
        );
        assert_eq!(html.matches("class=\"tl-op ok failed\"").count(), 1);
        assert_eq!(html.matches("class=\"tl-op info\"").count(), 1);
        assert!(html.contains("<ol class=\"ops\" start=\"1\">"));
        // Self-contained.
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(finite_numbers_only(&html));
        assert!(html.contains(">healed</text>"));
        // Availability per kind of fault: one row each, the leader kill against its target.
        assert_eq!(html.matches("class=\"outage-row\"").count(), 2);
        assert!(html.contains(">kill-leader</td>"), "no kill-leader row");
        assert!(html.contains("≤ 2000 ms: "), "no target shown");
        assert!(html.ends_with("</html>\n"));
    }

    #[test]
    fn a_run_without_operations_renders() {
        let result = CheckResult::Ok;
        let s = summary(&[], &[], &result);
        let input = ReportInput {
            summary: &s,
            ops: &[],
            events: &[],
            from: 0,
            to: 0,
            healed_at: 0,
            violation: None,
        };
        let html = render(&input);
        assert!(html.contains("No fault was injected."));
        assert!(html.contains("no acknowledged operation"));
        assert!(finite_numbers_only(&html));
        assert!(!html.contains("class=\"tl-op "));
    }

    #[test]
    fn the_same_run_gives_the_same_bytes() {
        let (a, b) = (fixture(), fixture());
        assert_eq!(render(&a.input()), render(&b.input()));
    }

    #[test]
    fn the_windows_are_the_verdicts_and_an_open_one_closes_at_heal_all() {
        let events = events();
        let ours: Vec<(u64, u64)> = fault_windows(&events, 30 * S)
            .iter()
            .map(|w| (w.start, w.stop))
            .collect();
        assert_eq!(ours, verdict::fault_windows(&events));
        let unclosed = vec![
            event(3 * S, "start", "pause", "SIGSTOP node(s) 1"),
            event(9 * S, "stop", "heal-all", "every fault healed"),
            event(10 * S, "start", "loss", "drop"),
        ];
        let windows = fault_windows(&unclosed, 30 * S);
        let spans: Vec<(&str, u64, u64)> =
            windows.iter().map(|w| (w.kind, w.start, w.stop)).collect();
        assert_eq!(spans, [("pause", 3 * S, 9 * S), ("loss", 10 * S, 30 * S)]);
    }

    #[test]
    fn the_scatter_is_capped_and_keeps_the_slowest() {
        let all: Vec<Latency> = (0..20_000u64)
            .map(|i| Latency {
                invoke: i * MS,
                latency: (i * 7_919) % 10_007 * 1_000,
            })
            .collect();
        let sample = sample_points(&all, MAX_SCATTER_POINTS);
        assert!(sample.len() <= MAX_SCATTER_POINTS && sample.len() > MAX_SCATTER_POINTS / 2);
        let mut slowest: Vec<u64> = all.iter().map(|p| p.latency).collect();
        slowest.sort_unstable_by(|a, b| b.cmp(a));
        let kept: Vec<u64> = sample.iter().map(|p| p.latency).collect();
        assert!(slowest[..SLOWEST_KEPT].iter().all(|l| kept.contains(l)));
        assert!(sample.windows(2).all(|w| w[0].invoke <= w[1].invoke));
        assert_eq!(sample, sample_points(&all, MAX_SCATTER_POINTS));
    }

    #[test]
    fn the_timeline_keeps_the_failed_op_and_what_overlaps_it() {
        // 200 sequential ops of one client, then a failed read overlapped by two others.
        let mut sub: Vec<Operation> = (0..200u64)
            .map(|i| Operation::put(1, "k", i.to_string()).ok_at(i * 10 * MS, i * 10 * MS + MS))
            .collect();
        let failed = Operation::get(2, "k", Some("x")).ok_at(2_100 * MS, 2_200 * MS);
        sub.push(Operation::put(3, "k", "y").ok_at(2_050 * MS, 2_150 * MS));
        sub.push(failed.clone());
        sub.push(Operation::put(4, "k", "z").info_at(2_120 * MS));
        let v = Violation {
            key: "k".into(),
            linearized_prefix: Vec::new(),
            failed_op: failed.clone(),
            failed_index: 0,
            sub_history: sub,
        };
        let (ops, total) = timeline_ops(&v);
        assert_eq!((ops.len(), total), (MAX_TIMELINE_OPS, 203));
        assert_eq!(ops.iter().filter(|(_, f)| *f).count(), 1);
        assert!(ops.iter().any(|(op, f)| *f && **op == failed));
        assert!(ops.iter().any(|(op, _)| op.client == 3));
        assert!(ops.iter().any(|(op, _)| op.client == 4));
        // The sequential ones kept are the latest.
        assert!(ops.iter().any(|(op, _)| op.invoke == 1_990 * MS));
        assert!(!ops.iter().any(|(op, _)| op.invoke == 0));
        assert!(ops.windows(2).all(|w| w[0].0.invoke <= w[1].0.invoke));
    }

    #[test]
    fn escaping_covers_markup_quotes_and_control_characters() {
        assert_eq!(
            escape("<a href='x'>&\"\u{0}\n"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;\u{FFFD}\n"
        );
        assert_eq!(truncate("héllo wörld", 5), "héllo…");
        assert_eq!(truncate("abc", 5), "abc");
    }

    #[test]
    fn long_runs_get_wider_buckets() {
        assert_eq!(bucket_ns(30 * S), S);
        assert_eq!(bucket_ns(3_600 * S), S);
        assert_eq!(bucket_ns(7_200 * S), 2 * S);
        assert_eq!(per_bucket(&[], 0, S).len(), 1);
    }
}
