//! Plain-text tables for the commands' human output (`--json` is for
//! machines): every column as wide as its widest cell, header included, so a
//! long deal id or topic name never pushes the columns after it out of line.
//! Fixed widths (`{:<28}`) did, for any value longer than the width.

use std::io::{self, Write};

/// Which side of its column a cell keeps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text: ids, names, times.
    Left,
    /// Numbers.
    Right,
}

/// A table being filled: its columns, then one row at a time.
pub struct Table {
    headers: Vec<&'static str>,
    aligns: Vec<Align>,
    rows: Vec<Row>,
}

/// A row's cells, and the lines printed under it as they are (the locks
/// of a deal in `replay`), which do not count toward the widths.
struct Row {
    cells: Vec<String>,
    notes: Vec<String>,
}

/// Spaces between two columns.
const GAP: &str = "  ";

impl Table {
    /// A table of these columns (header, alignment), with no rows yet.
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        assert!(!columns.is_empty(), "a table has at least one column");
        Table {
            headers: columns.iter().map(|(h, _)| *h).collect(),
            aligns: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row: one cell per column, in the columns' order.
    pub fn row(&mut self, cells: Vec<String>) {
        self.row_with_notes(cells, Vec::new());
    }

    /// Adds a row followed by `notes`, lines written under it as they are.
    pub fn row_with_notes(&mut self, cells: Vec<String>, notes: Vec<String>) {
        assert_eq!(
            cells.len(),
            self.headers.len(),
            "a row has one cell per column"
        );
        self.rows.push(Row { cells, notes });
    }

    /// Writes the header line and every row, each line without trailing
    /// spaces.
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(&row.cells) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let header = Row {
            cells: self.headers.iter().map(|h| h.to_string()).collect(),
            notes: Vec::new(),
        };
        for Row { cells, notes } in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str(GAP);
                }
                let pad = widths[i] - cell.chars().count();
                match self.aligns[i] {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            writeln!(out, "{}", line.trim_end())?;
            for note in notes {
                writeln!(out, "{note}")?;
            }
        }
        Ok(())
    }

    /// [`Table::write_to`] standard output.
    pub fn print(&self) -> io::Result<()> {
        self.write_to(&mut io::stdout().lock())
    }
}

/// The table of a ledger's streams that `ingest`, `verify`, `export`,
/// `import` and `rebuild` print: stream, entries, head seq, then the
/// `extra` columns (left-aligned), then the head hash; one row each, cells
/// in that order.
pub fn stream_table(extra: &[&'static str]) -> Table {
    let mut columns = vec![
        ("stream", Align::Left),
        ("entries", Align::Right),
        ("head seq", Align::Right),
    ];
    columns.extend(extra.iter().map(|&name| (name, Align::Left)));
    columns.push(("head hash", Align::Left));
    Table::new(&columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(table: &Table) -> String {
        let mut out = Vec::new();
        table.write_to(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut t = Table::new(&[("deal", Align::Left), ("events", Align::Right)]);
        t.row(vec!["a-much-longer-deal-id".into(), "7".into()]);
        t.row(vec!["d".into(), "1234".into()]);
        assert_eq!(
            written(&t),
            "deal                   events\n\
             a-much-longer-deal-id       7\n\
             d                        1234\n"
        );
    }

    #[test]
    fn a_header_wider_than_its_cells_sets_the_width_and_no_line_ends_in_spaces() {
        let mut t = Table::new(&[("stream", Align::Left), ("reason", Align::Left)]);
        t.row(vec!["t/0".into(), String::new()]);
        t.row(vec!["é/1".into(), "why".into()]);
        assert_eq!(written(&t), "stream  reason\nt/0\né/1     why\n");
    }

    #[test]
    fn notes_go_under_their_row_and_do_not_widen_its_columns() {
        let mut t = Table::new(&[("deal", Align::Left), ("events", Align::Right)]);
        t.row_with_notes(
            vec!["d1".into(), "3".into()],
            vec!["    a long note line".into()],
        );
        t.row(vec!["d2".into(), "10".into()]);
        assert_eq!(
            written(&t),
            "deal  events\nd1         3\n    a long note line\nd2        10\n"
        );
    }

    #[test]
    #[should_panic(expected = "one cell per column")]
    fn a_row_of_the_wrong_length_is_a_bug() {
        Table::new(&[("a", Align::Left)]).row(vec![]);
    }
}
