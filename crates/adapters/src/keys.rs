//! A method's keys declared once: [`method_keys!`] writes the config struct (serde names, defaults) and the
//! list of its keys with their help, which the CLI turns into flags and the training config checks TOML
//! keys against.

/// One key of a method's config: its name in files and flags, other accepted spellings, its help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub doc: &'static str,
}

/// `pub struct Name { /// doc \n key | "alias": Type = default, … }`: the struct with `serde(default)`, its
/// `Default` from the listed values, and `Name::KEYS`.
macro_rules! method_keys {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])* $field:ident $(| $alias:literal)? : $ty:ty = $default:expr ),* $(,)?
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(default)]
        #[allow(non_snake_case)]
        pub struct $name {
            $( $(#[doc = $doc])* $(#[serde(alias = $alias)])? pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }

        impl $name {
            /// This method's own keys.
            pub const KEYS: &'static [$crate::keys::Key] = &[
                $( $crate::keys::Key {
                    name: stringify!($field),
                    aliases: &[$($alias)?],
                    doc: concat!($($doc),*),
                }, )*
            ];
        }
    };
}

pub(crate) use method_keys;
