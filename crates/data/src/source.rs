//! Data files read into records or plain text. The container is decided from the extension and the whole
//! file, never from its first line: a `.jsonl` with one bad line fails naming the line, a pretty-printed JSON
//! array is an array, and a file of unknown type that is part JSON, part prose is refused rather than read as
//! text.

use factune_io::{Error, Result};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

factune_io::choice! {
    /// How a data file is read: `auto` decides from the extension and the whole file; the container names
    /// force one; `alpaca` and `chat` force the record shape (the container still comes from the file).
    pub enum DataFormat for "data_format" {
        Auto = "auto",
        Text = "text" | "txt",
        Jsonl = "jsonl" | "ndjson",
        Json = "json",
        Csv = "csv",
        Tsv = "tsv",
        Parquet = "parquet",
        Alpaca = "alpaca",
        Chat = "chat",
    }
}

/// Where a record sits in its file, for messages: JSON lines count lines, arrays and tables count records
/// (from 1), a directory of Parquet files names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    Line(usize),
    Record(usize),
    Row(usize, Option<PathBuf>),
}

impl fmt::Display for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Locator::Line(n) => write!(f, "line {n}"),
            Locator::Record(n) => write!(f, "record {n}"),
            Locator::Row(n, None) => write!(f, "row {n}"),
            Locator::Row(n, Some(p)) => write!(f, "{}: row {n}", p.display()),
        }
    }
}

#[derive(Clone)]
pub struct Record {
    pub at: Locator,
    pub fields: Map<String, Value>,
}

#[derive(Clone)]
pub enum Contents {
    /// Documents separated by blank lines.
    Text(String),
    Records(Vec<Record>),
}

/// Reads `path` (a file, or a directory of Parquet files as the Hub and `datasets.to_parquet` lay them out).
pub fn read(path: &Path, format: DataFormat) -> Result<Contents> {
    if path.is_dir() {
        return read_dir(path);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let container = match format {
        DataFormat::Auto | DataFormat::Alpaca | DataFormat::Chat => match ext.as_deref() {
            Some("jsonl" | "ndjson") => DataFormat::Jsonl,
            Some("json") => DataFormat::Json,
            Some("csv") => DataFormat::Csv,
            Some("tsv") => DataFormat::Tsv,
            Some("parquet") => DataFormat::Parquet,
            Some("txt" | "text" | "md") if format == DataFormat::Auto => DataFormat::Text,
            _ => DataFormat::Auto,
        },
        forced => forced,
    };
    match container {
        DataFormat::Parquet => return parquet_rows(path, None).map(Contents::Records),
        DataFormat::Csv => return table(path, b',').map(Contents::Records),
        DataFormat::Tsv => return table(path, b'\t').map(Contents::Records),
        _ => {}
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if container == DataFormat::Auto && bytes.starts_with(b"PAR1") {
        return parquet_rows(path, None).map(Contents::Records);
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::invalid(
            path,
            format!(
                "not UTF-8 text (byte {}); data files are text, JSON, CSV or Parquet",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    match container {
        DataFormat::Text => Ok(Contents::Text(text)),
        DataFormat::Jsonl => json_lines(path, &text).map(Contents::Records),
        DataFormat::Json => json_file(path, &text).map(Contents::Records),
        _ => sniff(path, text, format),
    }
}

/// A file whose name does not say what it holds: JSON lines if every non-empty line is a JSON object, a
/// JSON array if it is one, text if no line is JSON; anything in between is refused.
fn sniff(path: &Path, text: String, format: DataFormat) -> Result<Contents> {
    if text.trim_start().starts_with('[') {
        if let Ok(records) = json_array(path, &text) {
            return Ok(Contents::Records(records));
        }
    }
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| (n + 1, l))
        .collect();
    let is_object = |l: &str| matches!(serde_json::from_str::<Value>(l), Ok(Value::Object(_)));
    let objects = lines.iter().filter(|(_, l)| is_object(l)).count();
    if objects == 0 && format == DataFormat::Auto {
        return Ok(Contents::Text(text));
    }
    if objects == lines.len() && objects > 0 {
        return json_lines(path, &text).map(Contents::Records);
    }
    let (n, _) = lines
        .iter()
        .find(|(_, l)| !is_object(l))
        .expect("some line is not an object");
    Err(Error::invalid(
        path,
        if objects == 0 {
            format!(
                "line {n}: not a JSON object, but data_format = \"{format}\" reads JSON records"
            )
        } else {
            format!(
                "{objects} of {} lines are JSON objects but line {n} is not: fix it, or name the \
                 file .jsonl (JSON lines) or .txt (plain text), or pass --data-format",
                lines.len()
            )
        },
    ))
}

fn object(v: Value, at: Locator, path: &Path) -> Result<Record> {
    match v {
        Value::Object(fields) => Ok(Record { at, fields }),
        other => Err(Error::invalid(
            path,
            format!(
                "{at}: a record must be a JSON object, found {}",
                kind(&other)
            ),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One JSON object per non-empty line; every line must parse.
fn json_lines(path: &Path, text: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = Locator::Line(n + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| {
            let whole = if n == 0 {
                match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(_)) => {
                        "; the whole file is one JSON object: give one object per \
                                             line, or a JSON array of objects in a .json file"
                    }
                    _ => "",
                }
            } else {
                ""
            };
            Error::invalid(path, format!("{at}: malformed JSON: {e}{whole}"))
        })?;
        out.push(object(v, at, path)?);
    }
    Ok(out)
}

/// A `.json` file: an array of objects (pretty-printed or not), or JSON lines (what `datasets.to_json`
/// writes).
fn json_file(path: &Path, text: &str) -> Result<Vec<Record>> {
    if text.trim_start().starts_with('[') {
        json_array(path, text)
    } else {
        json_lines(path, text)
    }
}

fn json_array(path: &Path, text: &str) -> Result<Vec<Record>> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::invalid(path, format!("malformed JSON array: {e}")))?;
    let Value::Array(items) = v else {
        return Err(Error::invalid(path, "expected a JSON array of records"));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| object(v, Locator::Record(i + 1), path))
        .collect()
}

/// CSV/TSV with a header row; every cell is a string field named by its column.
fn table(path: &Path, delimiter: u8) -> Result<Vec<Record>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_path(path)
        .map_err(|e| csv_error(path, e))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| csv_error(path, e))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if let Some(dup) = header
        .iter()
        .enumerate()
        .find(|(i, h)| header[..*i].contains(h))
    {
        return Err(Error::invalid(
            path,
            format!("the header names column `{}` twice", dup.1),
        ));
    }
    let mut out = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let row = row.map_err(|e| csv_error(path, e))?;
        let fields = header
            .iter()
            .zip(row.iter())
            .map(|(h, cell)| (h.clone(), Value::String(cell.to_string())))
            .collect();
        out.push(Record {
            at: Locator::Row(i + 1, None),
            fields,
        });
    }
    Ok(out)
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => Error::io(path, e),
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => Error::invalid(
            path,
            format!(
                "line {}: {len} fields, but the header has {expected_len}",
                pos.map(|p| p.line()).unwrap_or(0)
            ),
        ),
        csv::ErrorKind::Utf8 { pos, err } => Error::invalid(
            path,
            format!(
                "line {}: not UTF-8 ({err})",
                pos.map(|p| p.line()).unwrap_or(0)
            ),
        ),
        other => Error::invalid(path, format!("malformed CSV: {other:?}")),
    }
}

/// Rows of a Parquet file as JSON objects (lists of structs, such as `messages`, become arrays of objects).
/// The `parquet` crate asserts on some malformed files (found by the fuzz harness): its reading is guarded.
fn parquet_rows(path: &Path, dir: Option<&Path>) -> Result<Vec<Record>> {
    factune_io::error::guarded(path, || parquet_rows_unguarded(path, dir))?
}

fn parquet_rows_unguarded(path: &Path, dir: Option<&Path>) -> Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: parquet::errors::ParquetError| {
        Error::invalid(path, format!("unreadable Parquet file: {e}"))
    };
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let shown = dir.map(|d| path.strip_prefix(d).unwrap_or(path).to_path_buf());
    let mut out = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let at = Locator::Row(i + 1, shown.clone());
        out.push(object(row.map_err(bad)?.to_json_value(), at, path)?);
    }
    Ok(out)
}

/// A dataset directory: its Parquet files in name order (`data/train-00000-of-00002.parquet`, …). An Arrow
/// `save_to_disk` directory is named as such, with the one-line conversion.
fn read_dir(dir: &Path) -> Result<Contents> {
    let mut files = Vec::new();
    let mut arrow = false;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = entry.map_err(|e| Error::io(&d, e))?.path();
            match p.extension().and_then(|e| e.to_str()) {
                _ if p.is_dir() => stack.push(p),
                Some("parquet") => files.push(p),
                Some("arrow") => arrow = true,
                _ => {}
            }
        }
    }
    if files.is_empty() {
        return Err(Error::invalid(
            dir,
            if arrow {
                "a `datasets` save_to_disk directory (Arrow files), which factune does not read: write it as \
                 Parquet with `datasets.load_from_disk(DIR).to_parquet(\"train.parquet\")` and pass that file"
            } else {
                "a directory with no .parquet files: pass a data file (.jsonl, .json, .csv, .tsv, .parquet, .txt)"
            },
        ));
    }
    files.sort();
    let mut out = Vec::new();
    for f in &files {
        out.extend(parquet_rows(f, Some(dir))?);
    }
    Ok(Contents::Records(out))
}
