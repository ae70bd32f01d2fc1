//! PNG charts of `tidelock bench compare`: the TTFT distribution of every router/policy as a
//! CDF on one plot, and their token hit rates as bars (with the goal and the workload's own
//! bound as lines). Drawn with plotters' bitmap backend; text needs a TrueType font, taken from
//! `$TIDELOCK_FONT` or the usual DejaVu Sans paths (`scripts/prereqs.sh` installs
//! `fonts-dejavu-core` where it is missing).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

/// Where DejaVu Sans (or a font like it) usually lives.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

const FONT: &str = "sans-serif";

/// Registers the font once for every chart of this process.
fn font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("TIDELOCK_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            format!(
                "no font for the charts: set TIDELOCK_FONT to a .ttf file, or install \
                 fonts-dejavu-core (looked in {})",
                FONT_PATHS.join(", ")
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Registered fonts live as long as the process.
        plotters::style::register_font(FONT, FontStyle::Normal, Vec::leak(bytes))
            .map_err(|_| format!("{}: not a TrueType font", path.display()))
    })
    .clone()
}

/// One router/policy on the charts.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) label: String,
    /// Times to first token, seconds, of its successful requests.
    pub(crate) ttfts_s: Vec<f64>,
    pub(crate) hit_rate: f64,
}

/// A distinct colour per series, from plotters' palette.
fn colour(i: usize) -> RGBColor {
    let (r, g, b) = Palette99::pick(i).rgb();
    RGBColor(r, g, b)
}

fn drawing_error(path: &Path) -> impl Fn(String) -> String + '_ {
    move |e| format!("drawing {}: {e}", path.display())
}

/// The TTFT CDF of every series, milliseconds on a log axis.
pub(crate) fn ttft_cdf(path: &Path, title: &str, series: &[Series]) -> Result<(), String> {
    font()?;
    let err = drawing_error(path);
    let all = series.iter().flat_map(|s| s.ttfts_s.iter().copied());
    let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), t| {
        (lo.min(t * 1e3), hi.max(t * 1e3))
    });
    if !(lo.is_finite() && hi > 0.0) {
        return Err(format!("{}: no TTFT to chart", path.display()));
    }
    let (lo, hi) = ((lo * 0.8).max(0.01), hi * 1.25);
    let root = BitMapBackend::new(path, (1100, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("time to first token (ms, log scale)")
        .y_desc("fraction of requests")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, s) in series.iter().enumerate() {
        let mut ms: Vec<f64> = s.ttfts_s.iter().map(|t| t * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len() as f64;
        let points = ms
            .iter()
            .enumerate()
            .map(|(k, &x)| (x.max(lo), (k + 1) as f64 / n));
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Each series' token hit rate as a horizontal bar; `lines` are drawn across (e.g. the goal and
/// the workload's bound), each with its label.
pub(crate) fn hit_rates(
    path: &Path,
    title: &str,
    series: &[Series],
    lines: &[(String, f64)],
) -> Result<(), String> {
    font()?;
    let err = drawing_error(path);
    let n = series.len();
    if n == 0 {
        return Err(format!("{}: nothing to chart", path.display()));
    }
    let root = BitMapBackend::new(path, (1100, 140 + 46 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..1.0, (0..n - 1).into_segmented())
        .map_err(|e| err(e.to_string()))?;
    let labels: Vec<&str> = series.iter().map(|s| s.label.as_str()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("token hit rate (cached / prompt tokens)")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                labels.get(*i).copied().unwrap_or_default().to_owned()
            }
            SegmentValue::Last => String::new(),
        })
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        let (top, bottom) = (SegmentValue::Exact(i), SegmentValue::Exact(i + 1));
        chart
            .draw_series([Rectangle::new(
                [(0.0, top), (s.hit_rate.clamp(0.0, 1.0), bottom)],
                c.mix(0.8).filled(),
            )])
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series([Text::new(
                format!("{:.3}", s.hit_rate),
                ((s.hit_rate + 0.01).min(0.93), SegmentValue::CenterOf(i)),
                (FONT, 15).into_font(),
            )])
            .map_err(|e| err(e.to_string()))?;
    }
    for (k, (label, x)) in lines.iter().enumerate() {
        let c = if k == 0 { RED } else { BLACK };
        let (x, label) = (*x, label.clone());
        chart
            .draw_series([PathElement::new(
                vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Last)],
                c.stroke_width(2),
            )])
            .map_err(|e| err(e.to_string()))?
            .label(format!("{label} ({x:.3})"))
            .legend(move |(px, py)| PathElement::new(vec![(px, py), (px + 24, py)], c));
    }
    if !lines.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PNG width and height from the IHDR chunk.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
        let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        (word(16), word(20))
    }

    #[test]
    fn charts_are_pngs_with_one_bar_per_series() {
        let dir = tempfile::tempdir().unwrap();
        let series: Vec<Series> = (0..3)
            .map(|i| Series {
                label: format!("router:policy{i}"),
                ttfts_s: (1..=50).map(|k| f64::from(k * (i + 1)) / 1e3).collect(),
                hit_rate: 0.2 * f64::from(i + 1),
            })
            .collect();
        let cdf = dir.path().join("ttft.png");
        ttft_cdf(&cdf, "TTFT", &series).unwrap();
        assert_eq!(png_size(&std::fs::read(&cdf).unwrap()), (1100, 700));
        let bars = dir.path().join("hit.png");
        hit_rates(&bars, "hit rate", &series, &[("goal".into(), 0.585)]).unwrap();
        assert_eq!(
            png_size(&std::fs::read(&bars).unwrap()),
            (1100, 140 + 46 * 3)
        );
        // Nothing to draw is an error, not an empty picture.
        let empty = Series {
            label: "x".into(),
            ttfts_s: Vec::new(),
            hit_rate: 0.0,
        };
        assert!(ttft_cdf(&dir.path().join("e.png"), "TTFT", &[empty]).is_err());
        assert!(hit_rates(&dir.path().join("e.png"), "hit", &[], &[]).is_err());
    }
}
