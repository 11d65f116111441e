//! The `PROTOCOLS` environment variable: `name:port` items separated by `;` or `,`.

use thiserror::Error;

/// One `name:port` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolsError {
    #[error("PROTOCOLS item '{0}' is not of the form name:port (for example datamover-v1:51515)")]
    Malformed(String),
    #[error("PROTOCOLS item '{item}' has an invalid port: use a number from 1 to 65535")]
    BadPort { item: String },
    #[error("PROTOCOLS is empty: list at least one protocol, for example datamover-v1:51515")]
    Empty,
}

/// Parses `PROTOCOLS`. `None` (unset) yields the default `datamover-v1:51515`.
pub fn parse(value: Option<&str>) -> Result<Vec<Protocol>, ProtocolsError> {
    let Some(value) = value else {
        return Ok(vec![Protocol {
            name: crate::PROTOCOL_NAME.to_string(),
            port: crate::DEFAULT_PORT,
        }]);
    };
    let mut out = Vec::new();
    for item in value
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (name, port) = item
            .rsplit_once(':')
            .ok_or_else(|| ProtocolsError::Malformed(item.to_string()))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(ProtocolsError::Malformed(item.to_string()));
        }
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ProtocolsError::BadPort {
                item: item.to_string(),
            })?;
        out.push(Protocol {
            name: name.to_string(),
            port,
        });
    }
    if out.is_empty() {
        return Err(ProtocolsError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_when_unset() {
        assert_eq!(
            parse(None).unwrap(),
            vec![Protocol {
                name: "datamover-v1".into(),
                port: 51515
            }]
        );
    }

    #[test]
    fn both_separators() {
        let p = parse(Some("datamover-v1:1234;other:5, third:6")).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].port, 1234);
        assert_eq!(p[2].name, "third");
    }

    #[test]
    fn errors() {
        assert!(matches!(
            parse(Some("nope")),
            Err(ProtocolsError::Malformed(_))
        ));
        assert!(matches!(
            parse(Some("a:70000")),
            Err(ProtocolsError::BadPort { .. })
        ));
        assert!(matches!(
            parse(Some("a:0")),
            Err(ProtocolsError::BadPort { .. })
        ));
        assert_eq!(parse(Some(" ; ")), Err(ProtocolsError::Empty));
    }
}
