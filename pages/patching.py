import streamlit as st
st.title("patching")
st.info("Coming soon.")
