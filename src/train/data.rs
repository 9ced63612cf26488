//! Training data: JSONL records of string (or number) fields, validated against what a job
//! needs, with errors that name the line and the field.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::tags::compose::Input;

/// One example: field name -> text (numbers are kept as their JSON text).
pub type Record = BTreeMap<String, String>;

/// The composition input of a record: its values for `slots` (a missing one is left out,
/// for composition to report).
pub fn slot_input(record: &Record, slots: &[&str]) -> Input {
    Input::Slots(
        slots
            .iter()
            .filter_map(|s| record.get(*s).map(|v| (s.to_string(), v.clone())))
            .collect(),
    )
}

#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub records: Vec<Record>,
}

fn field_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Dataset {
    /// Parses JSONL: one JSON object per non-empty line.
    pub fn from_jsonl(text: &str) -> Result<Self> {
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("line {}: not valid JSON: {e}", i + 1))?;
            records.push(Self::record(&value).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?);
        }
        if records.is_empty() {
            bail!("the dataset is empty");
        }
        Ok(Self { records })
    }

    /// Records given inline as JSON objects.
    pub fn from_values(values: &[Value]) -> Result<Self> {
        let records = values
            .iter()
            .enumerate()
            .map(|(i, v)| Self::record(v).map_err(|e| anyhow::anyhow!("record {i}: {e}")))
            .collect::<Result<Vec<_>>>()?;
        if records.is_empty() {
            bail!("the dataset is empty");
        }
        Ok(Self { records })
    }

    fn record(value: &Value) -> Result<Record> {
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("expected a JSON object"))?;
        obj.iter()
            .map(|(k, v)| {
                field_text(v)
                    .map(|t| (k.clone(), t))
                    .ok_or_else(|| anyhow::anyhow!("field `{k}` must be a string or a number"))
            })
            .collect()
    }

    /// Every record has every field in `fields`.
    pub fn require_fields(&self, fields: &[&str]) -> Result<()> {
        for (i, r) in self.records.iter().enumerate() {
            for f in fields {
                if !r.contains_key(*f) {
                    bail!("line {}: missing field `{f}`", i + 1);
                }
            }
        }
        Ok(())
    }

    /// The numeric targets in field `target`.
    pub fn numeric(&self, target: &str) -> Result<Vec<f64>> {
        self.records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let raw = r
                    .get(target)
                    .ok_or_else(|| anyhow::anyhow!("line {}: missing field `{target}`", i + 1))?;
                raw.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| {
                        anyhow::anyhow!("line {}: field `{target}` is not a number: {raw:?}", i + 1)
                    })
            })
            .collect()
    }

    /// Distinct values of field `target`, sorted: the labels of a classification head.
    pub fn labels(&self, target: &str) -> Result<Vec<String>> {
        self.require_fields(&[target])?;
        let mut labels: Vec<String> = self.records.iter().map(|r| r[target].clone()).collect();
        labels.sort();
        labels.dedup();
        if labels.len() < 2 {
            bail!("field `{target}` needs at least two distinct labels for classification");
        }
        Ok(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line_and_field() {
        let e = Dataset::from_jsonl("{\"x\": \"a\", \"y\": 1}\n\n{\"x\": \"b\", \"y\": \"z\"}\n")
            .unwrap()
            .numeric("y")
            .unwrap_err();
        assert!(
            e.to_string().contains("line 2: field `y` is not a number"),
            "{e}"
        );
        let e = Dataset::from_jsonl("{\"x\": \"a\"}\nnot json\n").unwrap_err();
        assert!(e.to_string().starts_with("line 2: not valid JSON"), "{e}");
        let e = Dataset::from_jsonl("  \n").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let d = Dataset::from_jsonl("{\"x\": \"a\"}\n{\"y\": \"b\"}").unwrap();
        assert!(d
            .require_fields(&["x"])
            .unwrap_err()
            .to_string()
            .contains("line 2: missing field `x`"));
        let e = Dataset::from_jsonl("{\"x\": [1]}").unwrap_err();
        assert!(
            e.to_string()
                .contains("field `x` must be a string or a number"),
            "{e}"
        );
    }
}
