//! A topic's rules for what producers may append (G10): its config with the JSON Schema
//! compiled once per change, checked by the leader before a batch reaches storage.
//!
//! The config lives in the naming server's book with the topic, reaches every replica with
//! its assignment, and is stored with the replica's topic meta, so a new leader after a
//! failover or a restart enforces the same rules.

use serde_json::Value;

use crate::error::Error;
use crate::wire::{Record, TopicConfig};

/// A topic's config, ready to check batches against.
pub struct Policy {
    /// The config the checks come from.
    pub config: TopicConfig,
    schema: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy").field("config", &self.config).finish()
    }
}

/// Parses and compiles a JSON Schema, or says why it is not one.
pub fn compile_schema(text: &str) -> Result<jsonschema::Validator, Error> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Error::invalid(format!("the schema is not valid JSON: {e}")))?;
    jsonschema::validator_for(&value)
        .map_err(|e| Error::invalid(format!("the schema is not a valid JSON Schema: {e}")))
}

impl Policy {
    /// Compiles `config`'s schema. A schema that does not compile was refused by the naming
    /// server; should one arrive anyway, the topic refuses every batch rather than take
    /// records unchecked.
    pub fn new(config: TopicConfig) -> Self {
        let schema = config.schema.as_deref().map(compile_schema).transpose();
        match schema {
            Ok(schema) => Self { config, schema },
            Err(e) => {
                tracing::error!(error = %e, "a topic's schema does not compile; refusing its batches");
                let never = jsonschema::validator_for(&Value::Bool(false)).expect("`false` is a schema");
                Self { config, schema: Some(never) }
            }
        }
    }

    /// Checks every record of a batch; the first bad one rejects the batch whole, naming its
    /// index in the batch and what is wrong with it.
    pub fn check(&self, topic: &str, records: &[Record]) -> Result<(), Error> {
        for (index, record) in records.iter().enumerate() {
            self.check_payload(&record.payload).map_err(|detail| Error::SchemaViolation {
                topic: topic.to_string(),
                index: index as u32,
                detail,
            })?;
        }
        Ok(())
    }

    /// Checks one record's payload against the schema (if any): what is wrong with it, or
    /// nothing. Clients check with this too, so a bad input line is named before it is sent.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), String> {
        let Some(schema) = &self.schema else { return Ok(()) };
        let value: Value =
            serde_json::from_slice(payload).map_err(|e| format!("the payload is not JSON: {e}"))?;
        schema.validate(&value).map_err(|e| {
            let path = e.instance_path().to_string();
            let at = if path.is_empty() { String::new() } else { format!(" at {path}") };
            format!("{e}{at}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &str) -> Record {
        Record { payload: payload.as_bytes().to_vec(), ..Record::default() }
    }

    const PERSON: &str = r#"{"type":"object","required":["name"],"properties":{"name":{"type":"string"},"age":{"type":"integer","minimum":0}}}"#;

    #[test]
    fn without_a_schema_any_bytes_pass() {
        let p = Policy::new(TopicConfig::default());
        assert!(p
            .check("t", &[record("not json"), Record { payload: vec![0xff, 0], ..Record::default() }])
            .is_ok());
    }

    #[test]
    fn the_first_bad_record_is_named_by_its_index_and_failure() {
        let p = Policy::new(TopicConfig { schema: Some(PERSON.into()), ..TopicConfig::default() });
        assert!(p.check("t", &[record(r#"{"name":"a"}"#), record(r#"{"name":"b","age":3}"#)]).is_ok());
        let err = p.check("t", &[record(r#"{"name":"a"}"#), record(r#"{"name":"b","age":-1}"#)]).unwrap_err();
        match err {
            Error::SchemaViolation { topic, index, detail } => {
                assert_eq!((topic.as_str(), index), ("t", 1));
                assert!(detail.contains("/age"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        let err = p.check("t", &[record("{")]).unwrap_err();
        assert!(
            matches!(err, Error::SchemaViolation { index: 0, ref detail, .. } if detail.contains("not JSON"))
        );
        let err = p.check("t", &[record(r#"{"age":1}"#)]).unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
    }

    #[test]
    fn bad_schemas_are_refused_with_the_reason() {
        assert!(compile_schema(PERSON).is_ok());
        assert!(compile_schema("{").unwrap_err().to_string().contains("not valid JSON"));
        let err = compile_schema(r#"{"type": 12}"#).unwrap_err();
        assert!(err.to_string().contains("not a valid JSON Schema"), "{err}");
    }
}
