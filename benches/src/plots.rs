//! The fan-out harness's plots, as SVG: latency CDF, instances answered
//! over time, node memory against instances answered.

use std::path::Path;

use plotters::prelude::*;

/// One method's data.
pub struct Series {
    pub name: String,
    /// Each instance's time to first response from the burst's start, ms.
    pub responses_ms: Vec<f64>,
    /// (instances answered, memory above the pre-burst level in bytes).
    pub memory: Vec<(usize, u64)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type DynErr = Box<dyn std::error::Error + Send + Sync>;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

/// Draw the three plots into `dir`.
pub fn draw(dir: &Path, series: &[Series]) -> anyhow::Result<()> {
    cdf(&dir.join("latency_cdf.svg"), series).map_err(err)?;
    over_time(&dir.join("instances_vs_time.svg"), series).map_err(err)?;
    memory(&dir.join("memory_vs_n.svg"), series).map_err(err)?;
    Ok(())
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

fn cdf(path: &Path, series: &[Series]) -> Result<(), DynErr> {
    let max = series
        .iter()
        .flat_map(|s| s.responses_ms.iter().copied())
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption("Time to first response (burst), CDF", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((1.0..max * 1.1).log_scale(), 0.0..1.0)?;
    c.configure_mesh()
        .x_desc("ms from the burst's start (log)")
        .y_desc("fraction of instances")
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let v = sorted(&s.responses_ms);
        let n = v.len().max(1) as f64;
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            v.iter()
                .enumerate()
                .map(|(k, &x)| (x.max(1.0), (k + 1) as f64 / n)),
            color.stroke_width(2),
        ))?
        .label(s.name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn over_time(path: &Path, series: &[Series]) -> Result<(), DynErr> {
    let max_t = series
        .iter()
        .flat_map(|s| s.responses_ms.iter().copied())
        .fold(1.0, f64::max)
        / 1e3;
    let max_n = series
        .iter()
        .map(|s| s.responses_ms.len())
        .max()
        .unwrap_or(1);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption("Instances answered over time", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_t * 1.05, 0..max_n + max_n / 20 + 1)?;
    c.configure_mesh()
        .x_desc("seconds from the burst's start")
        .y_desc("instances answered")
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let v = sorted(&s.responses_ms);
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            std::iter::once((0.0, 0)).chain(v.iter().enumerate().map(|(k, &x)| (x / 1e3, k + 1))),
            color.stroke_width(2),
        ))?
        .label(s.name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn memory(path: &Path, series: &[Series]) -> Result<(), DynErr> {
    let max_n = series
        .iter()
        .flat_map(|s| s.memory.iter().map(|m| m.0))
        .max()
        .unwrap_or(1)
        .max(1);
    let max_m = series
        .iter()
        .flat_map(|s| s.memory.iter().map(|m| m.1 as f64 / 1048576.0))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption("Node memory against instances answered", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0..max_n + max_n / 20 + 1, 0.0..max_m * 1.1)?;
    c.configure_mesh()
        .x_desc("instances answered (all alive)")
        .y_desc("MiB in use above the start (MemTotal - MemAvailable)")
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            s.memory.iter().map(|&(n, b)| (n, b as f64 / 1048576.0)),
            color.stroke_width(2),
        ))?
        .label(s.name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
