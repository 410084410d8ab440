//! SVG line charts for the benches and the demo (`--plot FILE`): what people would rather
//! look at than read, e.g. DCI throughput per class against the budget, over time.

use std::path::Path;

use plotters::prelude::*;

/// One line: its name in the legend and its points (x, y).
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// A chart: title, axis descriptions, lines, and dashed horizontal marks (e.g. a budget).
pub struct Chart<'a> {
    /// Caption above the chart.
    pub title: &'a str,
    /// What x is (with its unit).
    pub x_label: &'a str,
    /// What y is (with its unit).
    pub y_label: &'a str,
    /// The lines.
    pub series: Vec<Series>,
    /// Horizontal marks: (legend text, y).
    pub marks: Vec<(String, f64)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Writes `chart` to `path` as SVG.
pub fn write_svg(path: &Path, chart: &Chart) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let x_max = points.clone().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let y_max = points
        .map(|p| p.1)
        .chain(chart.marks.iter().map(|m| m.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(s.name.clone())
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    for (label, y) in &chart.marks {
        let y = *y;
        c.draw_series(DashedLineSeries::new(
            [(0.0, y), (x_max, y)],
            6,
            4,
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label(label.clone())
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_an_svg_with_its_lines_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let chart = Chart {
            title: "DCI throughput",
            x_label: "seconds",
            y_label: "MB/s",
            series: vec![Series {
                name: "sync".into(),
                points: vec![(0.0, 0.0), (1.0, 90.0), (2.0, 110.0)],
            }],
            marks: vec![("budget".into(), 125.0)],
        };
        write_svg(&path, &chart).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for text in ["DCI throughput", "seconds", "MB/s", "sync", "budget"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.contains("<polyline") || svg.contains("<path"));
    }
}
