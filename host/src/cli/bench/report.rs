//! The results: a Markdown table (stdout), JSON (`--json`), an SVG chart (`--chart`), and the
//! issue's targets, each marked met or not from the numbers measured.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

use super::load::CallStats;

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// A short run (`--quick`): proves the bench works, not worth quoting.
    pub quick: bool,
    /// The machine and the settings.
    pub setup: Setup,
    /// One entry per server, in the order measured.
    pub servers: Vec<ServerResult>,
    /// Warren's start-up with many handlers (`--compare` only).
    pub startup: Option<Startup>,
    /// Anything left out, and why.
    pub notes: Vec<String>,
}

/// Where and how it ran.
#[derive(Debug, Serialize)]
pub struct Setup {
    /// CPUs available to this process.
    pub cpus: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// The 1-minute load average when the run started.
    pub load_average: String,
    /// Measured time per call phase and server, seconds.
    pub window_secs: f64,
    /// With `--compare`: the rounds that time was cut into, taken by the servers in turn.
    pub rounds: Option<u32>,
    /// Casts in the flood.
    pub casts: u64,
    /// Bytes of the string echoed.
    pub payload_bytes: usize,
}

/// One server's figures.
#[derive(Debug, Serialize)]
pub struct ServerResult {
    /// `native`, `oslo.messaging`, `warren`, or the topic loaded.
    pub name: String,
    /// One entry per caller count.
    pub calls: Vec<CallStats>,
    /// The cast flood.
    pub flood: Option<FloodStats>,
    /// RSS one second after it was ready, KiB.
    pub rss_idle_kib: Option<u64>,
    /// RSS after the call phases, just before the flood, KiB.
    pub rss_before_flood_kib: Option<u64>,
    /// Peak RSS while draining the flood (sampled every 20 ms), KiB.
    pub rss_flood_peak_kib: Option<u64>,
}

impl ServerResult {
    /// Nothing measured yet.
    pub fn new(name: &str) -> ServerResult {
        ServerResult {
            name: name.to_owned(),
            calls: Vec::new(),
            flood: None,
            rss_idle_kib: None,
            rss_before_flood_kib: None,
            rss_flood_peak_kib: None,
        }
    }

    fn calls_with(&self, callers: usize) -> Option<&CallStats> {
        self.calls.iter().find(|c| c.callers == callers)
    }
}

/// A flood of casts.
#[derive(Debug, Clone, Serialize)]
pub struct FloodStats {
    /// Casts published (all confirmed).
    pub casts: u64,
    /// Time to publish them, seconds.
    pub publish_secs: f64,
    /// Time from the server's resumption (or the first publish) to an empty queue, seconds.
    pub drain_secs: f64,
    /// Casts drained per second.
    pub rate: f64,
}

/// Warren's start-up time with many handlers.
#[derive(Debug, Default, Serialize)]
pub struct Startup {
    /// Handlers configured (all the echo plugin, distinct topics).
    pub handlers: usize,
    /// Spawn to the `ready` log line with `cache_dir = ""`, milliseconds.
    pub no_cache_ms: Option<f64>,
    /// The same with an empty cache directory (compiles and writes the cache).
    pub cold_cache_ms: Option<f64>,
    /// The same again, from the cache written by the previous start.
    pub warm_cache_ms: Option<f64>,
    /// RSS one second after each start, KiB.
    pub no_cache_rss_kib: Option<u64>,
    /// RSS one second after the cold-cache start, KiB.
    pub cold_cache_rss_kib: Option<u64>,
    /// RSS one second after the warm-cache start, KiB.
    pub warm_cache_rss_kib: Option<u64>,
}

/// A figure read from one server's results, for the ratio columns.
type Metric<'a> = &'a dyn Fn(&ServerResult) -> Option<f64>;

/// One of the issue's targets.
struct Target {
    what: &'static str,
    goal: &'static str,
    measured: String,
    met: Option<bool>,
}

impl Report {
    /// An empty report for this machine and these settings.
    pub fn new(
        quick: bool,
        window: Duration,
        rounds: Option<u32>,
        casts: u64,
        payload_bytes: usize,
    ) -> Report {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
            .unwrap_or_default();
        Report {
            quick,
            setup: Setup {
                cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
                cpu_model,
                load_average,
                window_secs: window.as_secs_f64(),
                rounds,
                casts,
                payload_bytes,
            },
            servers: Vec::new(),
            startup: None,
            notes: Vec::new(),
        }
    }

    fn server(&self, name: &str) -> Option<&ServerResult> {
        self.servers.iter().find(|s| s.name == name)
    }

    fn caller_counts(&self) -> Vec<usize> {
        let mut counts: Vec<usize> = self
            .servers
            .iter()
            .flat_map(|s| s.calls.iter().map(|c| c.callers))
            .collect();
        counts.sort_unstable();
        counts.dedup();
        counts
    }

    /// The results as Markdown: one column per server, then the ratios.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let warren = self.server("warren");
        let native = self.server("native");
        let oslo = self.server("oslo.messaging");
        let ratios = warren.is_some();
        let _ = write!(out, "| |");
        for s in &self.servers {
            let _ = write!(out, " {} |", s.name);
        }
        if ratios {
            out.push_str(" warren/native | warren/oslo |");
        }
        out.push_str("\n|---|");
        for _ in &self.servers {
            out.push_str("---:|");
        }
        if ratios {
            out.push_str("---:|---:|");
        }
        out.push('\n');
        let ratio = |w: Option<f64>,
                     other: Option<&ServerResult>,
                     f: &dyn Fn(&ServerResult) -> Option<f64>| {
            match (w, other.and_then(f)) {
                (Some(w), Some(o)) if o > 0.0 => format!("{:.2}×", w / o),
                _ => "–".to_owned(),
            }
        };
        let mut row = |label: String,
                       cell: &dyn Fn(&ServerResult) -> String,
                       value: Option<Metric>| {
            let _ = write!(out, "| {label} |");
            for s in &self.servers {
                let _ = write!(out, " {} |", cell(s));
            }
            if ratios {
                match value {
                    Some(f) => {
                        let w = warren.and_then(f);
                        let _ = write!(out, " {} | {} |", ratio(w, native, f), ratio(w, oslo, f));
                    }
                    None => out.push_str(" | |"),
                }
            }
            out.push('\n');
        };
        for callers in self.caller_counts() {
            let plural = if callers == 1 { "" } else { "s" };
            let rate = move |s: &ServerResult| s.calls_with(callers).map(|c| c.rate);
            row(
                format!("calls/s, {callers} caller{plural}"),
                &|s| rate(s).map_or("–".into(), |r| format!("{r:.0}")),
                Some(&rate),
            );
            let p50 = move |s: &ServerResult| s.calls_with(callers).map(|c| c.p50_ms);
            row(
                format!("latency p50 / p99 / max (ms), {callers} caller{plural} (ratios: p50)"),
                &|s| {
                    s.calls_with(callers).map_or("–".into(), |c| {
                        format!("{:.2} / {:.2} / {:.1}", c.p50_ms, c.p99_ms, c.max_ms)
                    })
                },
                Some(&p50),
            );
            let errors = |s: &ServerResult| s.calls_with(callers).map_or(0, |c| c.errors);
            if self.servers.iter().any(|s| errors(s) > 0) {
                row(
                    format!("failed calls, {callers} caller{plural}"),
                    &|s| errors(s).to_string(),
                    None,
                );
            }
        }
        if self.servers.iter().any(|s| s.flood.is_some()) {
            let drain = |s: &ServerResult| s.flood.as_ref().map(|f| f.rate);
            row(
                format!("casts/s drained ({} queued)", thousands(self.setup.casts)),
                &|s| drain(s).map_or("–".into(), |r| format!("{r:.0}")),
                Some(&drain),
            );
        }
        let rss_row = |label: &str, f: fn(&ServerResult) -> Option<u64>| {
            (label.to_owned(), move |s: &ServerResult| mib(f(s)), f)
        };
        for (label, cell, f) in [
            rss_row("RSS idle", |s| s.rss_idle_kib),
            rss_row("RSS before the flood", |s| s.rss_before_flood_kib),
            rss_row("RSS peak while draining", |s| s.rss_flood_peak_kib),
        ] {
            if self.servers.iter().any(|s| f(s).is_some()) {
                row(label, &cell, None);
            }
        }
        if let Some(s) = &self.startup {
            let _ = writeln!(
                out,
                "\n| Warren with {} handlers | no cache (`cache_dir = \"\"`) | cold cache | warm cache |\n\
|---|---:|---:|---:|\n\
| start-up, spawn to `ready` | {} | {} | {} |\n\
| RSS 1 s after `ready` | {} | {} | {} |",
                s.handlers,
                opt_ms(s.no_cache_ms),
                opt_ms(s.cold_cache_ms),
                opt_ms(s.warm_cache_ms),
                mib(s.no_cache_rss_kib),
                mib(s.cold_cache_rss_kib),
                mib(s.warm_cache_rss_kib),
            );
        }
        let targets = self.targets();
        if !targets.is_empty() {
            out.push_str("\n| target | goal | measured | met |\n|---|---|---|---|\n");
            for t in targets {
                let met = match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "not measured",
                };
                let _ = writeln!(out, "| {} | {} | {} | {met} |", t.what, t.goal, t.measured);
            }
        }
        let s = &self.setup;
        let _ = writeln!(
            out,
            "\n{} CPUs ({}), load average {} at the start; {} s of calls per phase and server{}, {}-byte payload{}.",
            s.cpus,
            s.cpu_model,
            s.load_average,
            s.window_secs,
            match s.rounds {
                Some(n) if n > 1 => format!(" in {n} rounds taken in turn"),
                _ => String::new(),
            },
            s.payload_bytes,
            if self.quick {
                "; QUICK MODE: not representative"
            } else {
                ""
            }
        );
        for note in &self.notes {
            let _ = writeln!(out, "Note: {note}");
        }
        out
    }

    /// The issue's targets, judged from this run (only with a Warren column).
    fn targets(&self) -> Vec<Target> {
        let Some(warren) = self.server("warren") else {
            return Vec::new();
        };
        let native = self.server("native");
        let oslo = self.server("oslo.messaging");
        let mut targets = Vec::new();
        let judge = |w: Option<f64>, o: Option<f64>, goal: f64| match (w, o) {
            (Some(w), Some(o)) if o > 0.0 => (judged_ratio(w / o, goal), Some(w / o >= goal)),
            _ => ("–".to_owned(), None),
        };
        for callers in [1, 16] {
            let rate =
                |s: Option<&ServerResult>| s.and_then(|s| s.calls_with(callers)).map(|c| c.rate);
            let (measured, met) = judge(rate(Some(warren)), rate(native), 0.95);
            targets.push(Target {
                what: if callers == 1 {
                    "calls/s vs native, 1 caller"
                } else {
                    "calls/s vs native, 16 callers"
                },
                goal: "≥ 0.95×",
                measured,
                met,
            });
        }
        let drain = |s: Option<&ServerResult>| s.and_then(|s| s.flood.as_ref()).map(|f| f.rate);
        let (measured, met) = judge(drain(Some(warren)), drain(native), 0.95);
        targets.push(Target {
            what: "flood drain vs native",
            goal: "≥ 0.95×",
            measured,
            met,
        });
        let rate16 = |s: Option<&ServerResult>| s.and_then(|s| s.calls_with(16)).map(|c| c.rate);
        let (measured, met) = judge(rate16(Some(warren)), rate16(oslo), 6.0);
        targets.push(Target {
            what: "calls/s vs oslo.messaging, 16 callers",
            goal: "≥ 6×",
            measured,
            met,
        });
        targets.push(Target {
            what: "RSS idle, 10 handlers",
            goal: "≤ 40 MB",
            measured: format!("{} ({})", mib(warren.rss_idle_kib), mb(warren.rss_idle_kib)),
            met: warren.rss_idle_kib.map(|k| k * 1024 <= 40_000_000),
        });
        let flat = match (warren.rss_before_flood_kib, warren.rss_flood_peak_kib) {
            (Some(before), Some(peak)) => Some((before, peak)),
            _ => None,
        };
        targets.push(Target {
            what: "RSS flat during the flood",
            goal: "peak ≤ RSS before + 10%",
            measured: flat.map_or("–".into(), |(before, peak)| {
                format!("{} → peak {}", mib(Some(before)), mib(Some(peak)))
            }),
            met: flat.map(|(before, peak)| peak * 10 <= before * 11),
        });
        targets
    }

    /// A chart of the results: calls/s per caller count, latency percentiles at the largest
    /// caller count, and the drain rate, one bar per server in each group.
    pub fn svg(&self) -> String {
        let colours = ["#7f7f7f", "#e8a33d", "#2a7ab9", "#5aa05a", "#a05a9b"];
        let names: Vec<&str> = self.servers.iter().map(|s| s.name.as_str()).collect();
        let counts = self.caller_counts();
        let mut panels: Vec<Panel> = Vec::new();
        panels.push(Panel {
            title: "calls per second (higher is better)".into(),
            groups: counts
                .iter()
                .map(|&n| {
                    let label = format!("{n} caller{}", if n == 1 { "" } else { "s" });
                    let values = self
                        .servers
                        .iter()
                        .map(|s| s.calls_with(n).map(|c| c.rate))
                        .collect();
                    (label, values)
                })
                .collect(),
            format: |v| format!("{v:.0}"),
        });
        if let Some(&most) = counts.last() {
            let pick = |f: fn(&CallStats) -> f64| {
                self.servers
                    .iter()
                    .map(|s| s.calls_with(most).map(f))
                    .collect::<Vec<_>>()
            };
            panels.push(Panel {
                title: format!("latency at {most} callers, ms (lower is better)"),
                groups: vec![
                    ("p50".into(), pick(|c| c.p50_ms)),
                    ("p99".into(), pick(|c| c.p99_ms)),
                ],
                format: |v| format!("{v:.1}"),
            });
        }
        if self.servers.iter().any(|s| s.flood.is_some()) {
            panels.push(Panel {
                title: format!(
                    "casts drained per second ({} queued)",
                    thousands(self.setup.casts)
                ),
                groups: vec![(
                    "flood".into(),
                    self.servers
                        .iter()
                        .map(|s| s.flood.as_ref().map(|f| f.rate))
                        .collect(),
                )],
                format: |v| format!("{v:.0}"),
            });
        }
        let (panel_w, panel_h, top, left) = (300.0, 260.0, 70.0, 20.0);
        let width = left + panels.len() as f64 * (panel_w + 30.0);
        let height = top + panel_h + 60.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let title = format!(
            "warren bench --compare{}: echo over RabbitMQ, {} CPUs",
            if self.quick {
                " --quick (not representative)"
            } else {
                ""
            },
            self.setup.cpus
        );
        let _ = writeln!(
            svg,
            r#"<text x="{left}" y="22" font-size="15" font-weight="bold">{}</text>"#,
            esc(&title)
        );
        let mut x = left;
        for (i, name) in names.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let _ = writeln!(
                svg,
                r#"<rect x="{x}" y="34" width="12" height="12" fill="{colour}"/>"#
            );
            let _ = writeln!(svg, r#"<text x="{}" y="44">{}</text>"#, x + 16.0, esc(name));
            x += 30.0 + 7.0 * name.len() as f64;
        }
        for (p, panel) in panels.iter().enumerate() {
            let x0 = left + p as f64 * (panel_w + 30.0);
            panel.draw(&mut svg, x0, top, panel_w, panel_h, &colours);
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// One bar chart: groups of bars, one bar per server.
struct Panel {
    title: String,
    groups: Vec<(String, Vec<Option<f64>>)>,
    format: fn(f64) -> String,
}

impl Panel {
    fn draw(&self, svg: &mut String, x0: f64, y0: f64, w: f64, h: f64, colours: &[&str]) {
        let max = self
            .groups
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().copied())
            .fold(0.0f64, f64::max)
            .max(f64::MIN_POSITIVE);
        let (plot_top, plot_h) = (y0 + 20.0, h - 40.0);
        let base = plot_top + plot_h;
        let _ = writeln!(
            svg,
            r#"<text x="{x0}" y="{y0}" font-weight="bold">{}</text>"#,
            esc(&self.title)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{base}" x2="{}" y2="{base}" stroke="#333"/>"##,
            x0 + w
        );
        let group_w = w / self.groups.len().max(1) as f64;
        for (g, (label, values)) in self.groups.iter().enumerate() {
            let gx = x0 + g as f64 * group_w;
            let bar_w = (group_w - 20.0) / values.len().max(1) as f64;
            for (i, value) in values.iter().enumerate() {
                let Some(v) = value else { continue };
                let bh = plot_h * v / max;
                let bx = gx + 10.0 + i as f64 * bar_w;
                let colour = colours[i % colours.len()];
                let _ = writeln!(
                    svg,
                    r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{colour}"/>"#,
                    base - bh,
                    bar_w - 4.0
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                    bx + (bar_w - 4.0) / 2.0,
                    base - bh - 4.0,
                    esc(&(self.format)(*v))
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                gx + group_w / 2.0,
                base + 16.0,
                esc(label)
            );
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// KiB as MiB with one decimal, or a dash.
pub fn mib(kib: Option<u64>) -> String {
    kib.map_or("–".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// KiB as decimal megabytes.
fn mb(kib: Option<u64>) -> String {
    kib.map_or("–".into(), |k| {
        format!("{:.1} MB", k as f64 * 1024.0 / 1e6)
    })
}

fn opt_ms(ms: Option<f64>) -> String {
    ms.map_or("–".into(), |ms| format!("{ms:.0} ms"))
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A ratio judged against `goal`, to two decimals, or to three (cut, not rounded) where two
/// would round a miss up onto the goal: 0.9465 of a 0.95 goal reads 0.946×, not a 0.95× that
/// failed.
fn judged_ratio(ratio: f64, goal: f64) -> String {
    let two = format!("{ratio:.2}");
    if ratio < goal && two.parse::<f64>().is_ok_and(|r| r >= goal) {
        format!("{:.3}×", (ratio * 1000.0).floor() / 1000.0)
    } else {
        format!("{two}×")
    }
}

#[cfg(test)]
mod tests {
    use super::{judged_ratio, thousands};

    #[test]
    fn a_missed_goal_never_reads_as_the_goal() {
        assert_eq!(judged_ratio(0.9465, 0.95), "0.946×");
        assert_eq!(judged_ratio(0.94999, 0.95), "0.949×");
        assert_eq!(judged_ratio(5.996, 6.0), "5.996×");
        assert_eq!(judged_ratio(0.95, 0.95), "0.95×");
        assert_eq!(judged_ratio(0.9561, 0.95), "0.96×");
        assert_eq!(judged_ratio(0.871, 0.95), "0.87×");
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(2_000), "2,000");
        assert_eq!(thousands(999), "999");
    }
}
