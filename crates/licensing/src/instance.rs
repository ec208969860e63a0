//! This deployment's identity: the `mdmInfo` it writes to Apple to own a location.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vpp_store::{keys, update, Kv, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Stable for the life of the key-value store; what Apple echoes as `mdmInfo.id`.
    pub id: String,
    pub created_at: DateTime<Utc>,
}

/// The instance identity, created on first use. `candidate_id` is used only if none exists yet;
/// concurrent first uses agree on one id (compare-and-swap).
pub fn ensure(
    kv: &impl Kv,
    candidate_id: &str,
    now: DateTime<Utc>,
) -> Result<Instance, StoreError> {
    update::<Instance, Instance>(kv, &keys::instance(), |cur| match cur {
        Some(i) => Ok((None, i)),
        None => {
            let i = Instance {
                id: candidate_id.to_string(),
                created_at: now,
            };
            Ok((Some(i.clone()), i))
        }
    })
}

/// Longest `mdmInfo.name` Apple takes (characters).
pub const MAX_MDM_NAME_CHARS: usize = 100;
/// Longest `mdmInfo.metadata` Apple takes (characters).
pub const MAX_MDM_METADATA_CHARS: usize = 255;

/// Our `mdmInfo`: id, the configured name, and where we run as metadata; each cut to Apple's
/// length in characters (never inside one: names may be in any script).
pub fn mdm_info(instance: &Instance, name: &str, public_url: Option<&str>) -> vpp_apple::MdmInfo {
    vpp_apple::MdmInfo {
        id: instance.id.clone(),
        name: cut(name, MAX_MDM_NAME_CHARS),
        metadata: cut(public_url.unwrap_or("vpp-spin"), MAX_MDM_METADATA_CHARS),
    }
}

/// The first `max` characters of `s`.
pub fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpp_store::MemoryKv;

    #[test]
    fn long_names_in_any_script_are_cut_by_characters() {
        let i = Instance {
            id: "i".into(),
            created_at: Utc::now(),
        };
        // 'é' is two bytes: byte 100 falls inside a character.
        let name = format!("a{}", "é".repeat(150));
        let m = mdm_info(&i, &name, Some(&"ü".repeat(300)));
        assert_eq!(m.name.chars().count(), MAX_MDM_NAME_CHARS);
        assert!(m.name.starts_with("aé"));
        assert_eq!(m.metadata.chars().count(), MAX_MDM_METADATA_CHARS);
        let m = mdm_info(&i, "Schule Zürich 学校", None);
        assert_eq!(m.name, "Schule Zürich 学校");
        assert_eq!(m.metadata, "vpp-spin");
    }

    #[test]
    fn first_id_wins() {
        let kv = MemoryKv::default();
        let a = ensure(&kv, "one", Utc::now()).unwrap();
        let b = ensure(&kv, "two", Utc::now()).unwrap();
        assert_eq!(a.id, "one");
        assert_eq!(b.id, "one");
    }
}
